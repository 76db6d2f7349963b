"""The first program of every local machine: set the process up, then exec the job's argv.

Started by the supervisor in a new session as `python -S -P <this file>` (`python -m
jobrunner.local.process.launcher` works the same; running the file skips runpy, which is a third
of the start-up time). Protocol:

* stdin (fd 0): the spec, `marshal`-encoded, read to EOF (built by `supervisor._launcher_spec`;
  both sides are the same interpreter). fd 0 is then replaced by /dev/null: the job's stdin is
  empty.
* fd 3: the status pipe, close-on-exec. A successful exec closes it with nothing written. A set-up
  failure writes JSON `{"error": "...", "exit_code": N}` to it and exits with N (127: the program
  could not be executed; 1: anything else).
* stdout/stderr belong to the job: the launcher never writes there.

Order: join the memory cgroup (so everything after is accounted), set CPU affinity, bind volumes
and place files (private mount namespace), chdir to the workdir, restore default signal handling,
exec. Exec keeps the pid, so the supervisor's signals reach the program itself.

This runs once per machine start, so it imports as little as possible: builtin modules only
(`_signal` instead of `signal`, which would pull in enum; `marshal` instead of json), `typing`
only for the type checker, and proc_files only when there are files, without the package
__init__ modules (see `_bare_packages`). It needs nothing from site-packages.
"""

from __future__ import annotations

import marshal
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # same functions; `_signal` has no type stubs
    from typing import Any, NoReturn
else:
    import _signal

# First thing: Python installed a KeyboardInterrupt handler; a stop() during set-up should simply
# end the launcher like it would end the program.
_signal.signal(_signal.SIGINT, _signal.SIG_DFL)

STATUS_FD = 3
EXIT_CANNOT_EXEC = 127
EXIT_SETUP_FAILED = 1


class SetupFailure(Exception):
    """Set-up could not be completed; `message` goes to the supervisor as ProcessExit.error."""

    def __init__(self, message: str, exit_code: int = EXIT_SETUP_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def _read_spec() -> dict[str, Any]:
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    spec: dict[str, Any] = marshal.loads(b"".join(chunks))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return spec


def _join_cgroup(procs_file: str) -> None:
    try:
        with open(procs_file, "w") as fh:
            fh.write(str(os.getpid()))
    except OSError as exc:
        raise SetupFailure(f"cannot join the memory cgroup {procs_file!r}: {exc}") from exc


def _limit_cpus(cpus: int) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    try:
        os.sched_setaffinity(0, allowed[: max(1, cpus)])
    except OSError as exc:
        raise SetupFailure(f"cannot limit the process to {cpus} CPU(s): {exc}") from exc


def _bare_packages() -> None:
    """Make `jobrunner.local.process.*` importable without running the packages' __init__ modules.

    Those import the whole local server (httpx, starlette, ...), which is slow, and not even
    importable with `-S`; the launcher only needs two stdlib-only sibling modules.
    """
    here = os.path.dirname(os.path.abspath(__file__))  # .../jobrunner/local/process
    local = os.path.dirname(here)
    for name, path in (
        ("jobrunner", os.path.dirname(local)),
        ("jobrunner.local", local),
        ("jobrunner.local.process", here),
    ):
        if name not in sys.modules:
            package = type(sys)(name)
            package.__path__ = [path]
            sys.modules[name] = package


def _place_files(files: list[dict[str, Any]], stage_dir: str) -> None:
    _bare_packages()
    from jobrunner.local.process.files import FileToPlace, PlacementError, place_files

    wanted = [FileToPlace(f["guest_path"], f["content"], f["mode"]) for f in files]
    try:
        place_files(wanted, stage_dir)
    except PlacementError as exc:
        raise SetupFailure(str(exc)) from exc


def _bind_volumes(mounts: list[list[str]], workdir: str, stage_dir: str) -> None:
    _bare_packages()
    from jobrunner.local.process.files import (
        ROOT_DIR_NAME,
        PlacementError,
        VolumeToMount,
        bind_volumes,
    )

    wanted = [VolumeToMount(source, path) for source, path in mounts]
    try:
        bind_volumes(wanted, os.path.join(workdir, ROOT_DIR_NAME), stage_dir)
    except PlacementError as exc:
        message = str(exc).replace("cannot place file at", "cannot mount the volume at", 1)
        raise SetupFailure(message) from exc


def _restore_signals() -> None:
    # Dispositions set to "ignore" survive exec (Python ignores SIGPIPE and SIGXFSZ, a server
    # started with nohup ignores SIGHUP), so every signal goes back to its default, unblocked.
    for sig in _signal.valid_signals():
        if sig in (_signal.SIGKILL, _signal.SIGSTOP):
            continue
        try:  # noqa: SIM105 - contextlib would cost a few ms of start-up per machine
            _signal.signal(sig, _signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass  # signals the C library reserves for itself
    _signal.pthread_sigmask(_signal.SIG_SETMASK, set())


def _exec(argv: list[str], env: dict[str, str]) -> NoReturn:
    program = argv[0]
    try:
        os.execvpe(program, argv, env)
    except FileNotFoundError as exc:
        raise SetupFailure(f"executable not found: {program!r}", EXIT_CANNOT_EXEC) from exc
    except PermissionError as exc:
        raise SetupFailure(
            f"executable not permitted: {program!r} (permission denied)", EXIT_CANNOT_EXEC
        ) from exc
    except OSError as exc:
        raise SetupFailure(f"cannot execute {program!r}: {exc.strerror}", EXIT_CANNOT_EXEC) from exc


def _set_up_and_exec(spec: dict[str, Any]) -> NoReturn:
    if spec.get("cgroup_procs"):
        _join_cgroup(spec["cgroup_procs"])
    if spec.get("cpus"):
        _limit_cpus(int(spec["cpus"]))
    workdir = spec["workdir"]
    if spec.get("mounts"):
        _bind_volumes(spec["mounts"], workdir, spec["stage_dir"])
    if spec.get("files"):
        _place_files(spec["files"], spec["stage_dir"])
    try:
        os.chdir(workdir)
    except OSError as exc:
        raise SetupFailure(f"cannot enter the working directory {workdir!r}: {exc}") from exc
    _restore_signals()
    _exec(spec["argv"], spec["env"])


def _report(message: str, exit_code: int) -> NoReturn:
    import json

    try:  # noqa: SIM105 - see _restore_signals
        os.write(STATUS_FD, json.dumps({"error": message, "exit_code": exit_code}).encode())
    except OSError:
        pass  # the supervisor is gone; the exit status still tells the story
    os._exit(exit_code)


def main() -> NoReturn:
    """Entry point: never returns (execs the job or exits with a reported error)."""
    try:
        os.set_inheritable(STATUS_FD, False)  # close-on-exec: EOF tells the parent exec worked
        _set_up_and_exec(_read_spec())
    except SetupFailure as failure:
        _report(failure.message, failure.exit_code)
    except Exception as exc:  # a bug here must still reach the caller as a start error
        _report(f"the local launcher failed: {type(exc).__name__}: {exc}", EXIT_SETUP_FAILED)


if __name__ == "__main__":
    main()
