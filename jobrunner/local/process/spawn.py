"""Low-level process plumbing for the supervisor: spawning jobs, noticing exits, pids.

No threads anywhere: a job is started with posix_spawn (vfork-like, so a large process is not
copied), directly when it needs no set-up step inside the new process (`spawn_direct`), through
the launcher otherwise (`spawn_launcher`: files and mounts need a private mount namespace).
Exits are noticed through a pidfd registered with the event loop (or, on kernels without
pidfd_open, a cheap WNOHANG poll), and pipes are read by the event loop.

Every fd Python opens is close-on-exec, and spawns only dup the child's own pipes into 0..3, so a
job inherits exactly stdin (/dev/null), stdout and stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

__all__ = [
    "DirectPipes",
    "LauncherPipes",
    "SpawnFailure",
    "launcher_command",
    "process_start_time",
    "process_state",
    "reap",
    "signal_group",
    "spawn_direct",
    "spawn_launcher",
    "started_near",
    "wait_exited",
]

# Below this, a pipe end could collide with the 0..3 slots the launcher's fds are dup'ed into.
_LOW_FD_LIMIT = 10
_POLL_INTERVAL = 0.05
_LAUNCHER_PATH = str(Path(__file__).resolve().with_name("launcher.py"))


@dataclass(frozen=True)
class LauncherPipes:
    """The parent's ends of the launcher's pipes (all close-on-exec)."""

    spec: int  # write: the JSON spec (the launcher's stdin)
    stdout: int  # read
    stderr: int  # read
    status: int  # read: empty at EOF when exec succeeded, else the error JSON


def _high_fd(fd: int) -> int:
    if fd >= _LOW_FD_LIMIT:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _LOW_FD_LIMIT)
    os.close(fd)
    return moved


def _close_inherited(keep: int) -> list[tuple[int, int]]:
    """posix_spawn actions closing every inheritable fd above `keep` in the child.

    Python opens everything close-on-exec, but a caller may have made an fd inheritable (a test
    runner's capture fds, a socket handed to uvicorn): the job must see none of them.
    """
    actions = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > keep:
            try:
                inheritable = os.get_inheritable(fd)
            except OSError:
                continue  # the directory's own fd, already closed
            if inheritable:
                actions.append((os.POSIX_SPAWN_CLOSE, fd))
    return actions


def _pipe() -> tuple[int, int]:
    read, write = os.pipe()  # non-inheritable (O_CLOEXEC) as every fd Python creates
    return _high_fd(read), _high_fd(write)


def launcher_command() -> list[str]:
    """argv of the launcher.

    `-S` skips site-packages processing (the launcher uses only the stdlib) and running the file
    instead of `-m` skips runpy: together they halve the launcher's start-up time. `-P` keeps the
    launcher's own directory off sys.path, so sibling modules cannot shadow the stdlib.
    """
    return [sys.executable, "-S", "-P", _LAUNCHER_PATH]


def spawn_launcher() -> tuple[int, LauncherPipes]:
    """Start the launcher in a new session (pgid == sid == pid) and return (pid, parent ends).

    Raises OSError when the launcher cannot be started at all.
    """
    spec_r, spec_w = _pipe()
    out_r, out_w = _pipe()
    err_r, err_w = _pipe()
    status_r, status_w = _pipe()
    child_ends = (spec_r, out_w, err_w, status_w)
    try:
        catchable = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
        pid = os.posix_spawn(
            sys.executable,
            launcher_command(),
            {},  # the launcher needs no environment; the job's own is in its spec
            file_actions=[
                *((os.POSIX_SPAWN_DUP2, fd, slot) for slot, fd in enumerate(child_ends)),
                *_close_inherited(len(child_ends) - 1),
            ],
            setsid=True,
            setsigmask=(),
            setsigdef=catchable,
        )
    except BaseException:
        for fd in (spec_w, out_r, err_r, status_r):
            os.close(fd)
        raise
    finally:
        for fd in child_ends:
            os.close(fd)
    return pid, LauncherPipes(spec=spec_w, stdout=out_r, stderr=err_r, status=status_r)


@dataclass(frozen=True)
class DirectPipes:
    """The parent's ends of a directly spawned job's output pipes (close-on-exec)."""

    stdout: int
    stderr: int


class SpawnFailure(Exception):
    """The job's program could not be executed: same messages and codes as the launcher's."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


EXIT_CANNOT_EXEC = 127
EXIT_SETUP_FAILED = 1
_devnull_fd = -1


def _devnull() -> int:
    """One /dev/null fd for every job's stdin, opened once (close-on-exec, like all of ours)."""
    global _devnull_fd
    if _devnull_fd < 0:
        _devnull_fd = _high_fd(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    return _devnull_fd


def _find_program(program: str, env: dict[str, str]) -> str:
    """The path execvpe would run for `program`, searched on the *job's* PATH.

    posix_spawnp searches the caller's PATH, not the job's, so the search is done here.
    """
    if "/" in program:
        return program
    denied = False
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", program)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = True
    if denied:
        raise SpawnFailure(
            f"executable not permitted: {program!r} (permission denied)", EXIT_CANNOT_EXEC
        )
    raise SpawnFailure(f"executable not found: {program!r}", EXIT_CANNOT_EXEC)


def spawn_direct(argv: list[str], env: dict[str, str], workdir: str) -> tuple[int, DirectPipes]:
    """Start the job itself (no launcher) in a new session, stdin /dev/null, in `workdir`.

    Signal dispositions and the mask are reset to defaults, as the launcher does. posix_spawn has
    no chdir in Python 3.11, so the caller's working directory is switched around the spawn: the
    supervisor is single-threaded and uses absolute paths only, so nothing observes it.
    Raises SpawnFailure when the program cannot be executed, OSError for anything else.
    """
    program = _find_program(argv[0], env)
    out_r, out_w = _pipe()
    err_r, err_w = _pipe()
    child_ends = ((_devnull(), 0), (out_w, 1), (err_w, 2))
    previous = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.chdir(workdir)
        except OSError as exc:
            raise SpawnFailure(
                f"cannot enter the working directory {workdir!r}: {exc}", EXIT_SETUP_FAILED
            ) from exc
        try:
            pid = os.posix_spawn(
                program,
                argv,
                env,
                file_actions=[
                    *((os.POSIX_SPAWN_DUP2, fd, slot) for fd, slot in child_ends),
                    *_close_inherited(2),
                ],
                setsid=True,
                setsigmask=(),
                setsigdef=_CATCHABLE,
            )
        finally:
            os.fchdir(previous)
    except BaseException as exc:
        os.close(out_r)
        os.close(err_r)
        if isinstance(exc, SpawnFailure):
            raise
        if isinstance(exc, FileNotFoundError):
            raise SpawnFailure(f"executable not found: {argv[0]!r}", EXIT_CANNOT_EXEC) from exc
        if isinstance(exc, PermissionError):
            raise SpawnFailure(
                f"executable not permitted: {argv[0]!r} (permission denied)", EXIT_CANNOT_EXEC
            ) from exc
        if isinstance(exc, OSError) and exc.errno in (errno.ENOEXEC, errno.ENOTDIR, errno.ELOOP):
            raise SpawnFailure(
                f"cannot execute {argv[0]!r}: {exc.strerror}", EXIT_CANNOT_EXEC
            ) from exc
        raise
    finally:
        os.close(previous)
        os.close(out_w)
        os.close(err_w)
    return pid, DirectPipes(stdout=out_r, stderr=err_r)


_CATCHABLE = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}


def _has_exited(pid: int) -> bool:
    """True once `pid` (our child) has exited; it is NOT reaped, so its pid stays reserved."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True  # someone else reaped it


async def wait_exited(pid: int) -> None:
    """Return once child `pid` has exited, leaving it unreaped (a zombie).

    Keeping the zombie keeps the pid (and so the process group id) from being reused while we
    kill what is left of the group.
    """
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = -1
    if pidfd < 0:
        while not _has_exited(pid):
            await asyncio.sleep(_POLL_INTERVAL)
        return
    readable: asyncio.Future[None] = loop.create_future()
    # A pidfd turns readable when the process exits, and stays readable (level-triggered).
    loop.add_reader(pidfd, _resolve, readable)
    try:
        if not _has_exited(pid):
            await readable
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def reap(pid: int) -> int | None:
    """Collect the exit status of child `pid` (which has exited); None if it was already reaped."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return status


def signal_group(pgid: int, sig: int) -> None:
    """Send `sig` to process group `pgid`; a group that is already gone is not an error."""
    if pgid <= 1:
        raise ValueError(f"refusing to signal process group {pgid}")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (Unix time, ~1 s precision); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        with open("/proc/stat", "rb") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith(b"btime "))
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_state(pid: int) -> str | None:
    """The one-letter state of `pid` from /proc ("R", "S", "Z", ...), None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()[0].decode()


def started_near(pid: int, started_at: datetime, tolerance: float = 3.0) -> bool:
    """Whether `pid` is a process that started within `tolerance` seconds of `started_at`."""
    start = process_start_time(pid)
    return start is not None and abs(start - started_at.timestamp()) <= tolerance
