"""The local backend's process supervisor: run one machine's program as a local process.

`launch()` starts the program in a new session. A machine without files or mounts is started
directly with posix_spawn: it is born in its memory cgroup and with its CPU affinity (the calling
thread takes both for the instant of the spawn), so no interpreter runs per machine. A machine
with files goes through the launcher (jobrunner/local/process/launcher.py), which joins the memory
cgroup, sets CPU affinity, places config files in a private mount namespace and execs the
program (same pid, so signals reach it). The program's stdout/stderr are read by the event loop
and handed to `on_output` line by line.

`ProcessHandle` signals the process group, and `wait()` returns a `ProcessExit` once the
program has exited, its leftover children are killed and its output is delivered.

In the local server this runs inside the shim (shim.py), the long-lived parent of every
machine's process, not in the API server.

Everything runs on the event loop, without a thread per process, so hundreds of machines can run
at once. Memory limits use a cgroup (see proc_cgroup) or, where cgroups are unavailable, one
shared RSS watchdog (see proc_watchdog). Files: see proc_files for how and where they are placed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import marshal
import os
import signal as signals
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

from jobrunner.local.process import spawn as proc_spawn
from jobrunner.local.process.cgroup import MemoryCgroup, find_cgroup_root
from jobrunner.local.process.files import DEFAULT_FILE_MODE, STAGE_DIR_NAME
from jobrunner.local.process.orphans import kill_orphan_group, pid_alive
from jobrunner.local.process.output import (
    CollectPipeProtocol,
    LineSplitter,
    OutputPipeProtocol,
    WritePipeProtocol,
    utc_now,
)
from jobrunner.local.process.watchdog import RssWatchdog, watchdog_for_running_loop

__all__ = [
    "DEFAULT_HOME",
    "DEFAULT_PATH",
    "FileSpec",
    "MachineProcess",
    "MemoryEnforcement",
    "OutputCallback",
    "ProcessExit",
    "ProcessHandle",
    "ProcessSpec",
    "job_environment",
    "kill_orphan_group",
    "launch",
    "needs_launcher",
    "own_children",
    "pid_alive",
    "resolve_argv",
]

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_HOME = "/root"
#: After the program exits, how long leftover output may take to arrive before pipes are closed
#: (only matters when a process escaped the group and still holds the pipes).
OUTPUT_DRAIN_TIMEOUT = 2.0
#: How long launch() waits for the launcher to finish set-up and exec before killing it.
START_TIMEOUT = 30.0
_EXIT_UNKNOWN = 255

#: (stream "stdout" | "stderr", line without newline, UTC timestamp)
OutputCallback = Callable[[str, str, datetime], None]
#: "auto": a memory cgroup when available, else the RSS watchdog; "watchdog": always the watchdog.
MemoryEnforcement = Literal["auto", "watchdog"]


@dataclass(frozen=True)
class FileSpec:
    """A file the process must see at `guest_path` (never written to the host's real path)."""

    guest_path: str
    content: bytes
    mode: int | None = None  # chmod bits; None means 0o644


@dataclass(frozen=True)
class ProcessSpec:
    """Everything needed to start one machine's program."""

    argv: list[str]  # already resolved (see resolve_argv); non-empty
    env: dict[str, str]  # the complete environment (PATH and HOME get defaults if absent)
    files: list[FileSpec]
    cpus: int | None  # CPU affinity limited to min(cpus, available CPUs)
    memory_mb: int | None  # exceeding it kills the process with oom_killed=True
    workdir: Path  # private scratch directory; the process's working directory
    name: str = ""  # machine id, for cgroup names and log messages
    # Volumes: (directory on this computer, absolute path in the machine), bind-mounted by the
    # launcher in the process's private mount namespace (see proc_files.bind_volumes).
    mounts: tuple[tuple[str, str], ...] = ()


class MachineProcess(Protocol):
    """What the lifecycle needs of a machine's process: a ProcessHandle (this process is its
    parent) or a shim_client.RemoteHandle (the shim is)."""

    pid: int
    started_at: datetime

    @property
    def exited(self) -> bool: ...

    async def wait(self) -> ProcessExit: ...

    async def stop(self, signal: int = ..., timeout: float = ...) -> ProcessExit: ...

    def send_signal(self, signal: int) -> None: ...

    def suspend(self) -> None: ...

    def resume(self) -> None: ...

    def kill(self) -> None: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class ProcessExit:
    """How a process ended."""

    exit_code: int  # exit status; 128 + signal number when killed by a signal
    signal: int | None  # the signal that killed it, if any
    oom_killed: bool
    requested_stop: bool  # the exit followed stop() or kill()
    error: str | None  # set when the program could not be started at all
    exited_at: datetime  # timezone-aware UTC


def resolve_argv(
    exec_: list[str] | None, entrypoint: list[str] | None, cmd: list[str] | None
) -> list[str]:
    """The argv to run: `exec_` if set, else `entrypoint` + `cmd`.

    Raises ValueError when all are empty: the local backend does not pull images, so it cannot
    fall back to the image's own ENTRYPOINT/CMD.
    """
    if exec_:
        return list(exec_)
    argv = [*(entrypoint or []), *(cmd or [])]
    if not argv:
        raise ValueError(
            "no command to run: the local backend cannot read the image's own command "
            "(ENTRYPOINT/CMD); set init.exec or init.cmd (or init.entrypoint) in the machine config"
        )
    return argv


def job_environment(env: dict[str, str]) -> dict[str, str]:
    """The exact environment of the program: `env`, plus PATH and HOME defaults when absent."""
    result = dict(env)
    result.setdefault("PATH", DEFAULT_PATH)
    result.setdefault("HOME", DEFAULT_HOME)
    return result


def _validate(spec: ProcessSpec) -> None:
    if not spec.argv:
        raise ValueError("ProcessSpec.argv is empty; resolve it with resolve_argv() first")
    if spec.cpus is not None and spec.cpus < 1:
        raise ValueError(f"ProcessSpec.cpus must be at least 1, got {spec.cpus}")
    if spec.memory_mb is not None and spec.memory_mb < 1:
        raise ValueError(f"ProcessSpec.memory_mb must be at least 1, got {spec.memory_mb}")


def _launcher_spec(spec: ProcessSpec, cgroup: MemoryCgroup | None) -> bytes:
    """The launcher's spec: marshal, because it is the same interpreter and loads instantly."""
    files = [
        {
            "guest_path": f.guest_path,
            "content": bytes(f.content),
            "mode": DEFAULT_FILE_MODE if f.mode is None else f.mode,
        }
        for f in spec.files
    ]
    return marshal.dumps(
        {
            "argv": list(spec.argv),
            "env": job_environment(spec.env),
            "files": files,
            "cpus": spec.cpus,
            "cgroup_procs": str(cgroup.procs_file) if cgroup else None,
            "workdir": str(spec.workdir),
            "stage_dir": str(Path(spec.workdir) / STAGE_DIR_NAME),
            "mounts": [list(mount) for mount in spec.mounts],
        }
    )


def _memory_cgroup(spec: ProcessSpec, enforcement: MemoryEnforcement) -> MemoryCgroup | None:
    """A cgroup limiting the process's memory, or None when the watchdog must do it."""
    if enforcement == "watchdog" or spec.memory_mb is None:
        return None
    root, _reason = find_cgroup_root()
    if root is None:
        return None
    try:
        return root.create(spec.name, spec.memory_mb * 1024 * 1024)
    except OSError as exc:
        logger.warning(
            "cannot create a memory cgroup for %s (%s); using the RSS watchdog",
            spec.name or "a machine",
            exc,
            extra={"action": "cgroup"},
        )
        return None


def _output_protocol_factory(splitter: LineSplitter) -> Callable[[], OutputPipeProtocol]:
    return lambda: OutputPipeProtocol(splitter)


def _parse_status(data: bytes) -> tuple[str, int] | None:
    """(error, exit code) reported by the launcher, or None when it exec'd the program."""
    if not data:
        return None
    try:
        report: dict[str, Any] = json.loads(data)
        return str(report["error"]), int(report["exit_code"])
    except (ValueError, KeyError, TypeError):
        return f"the local launcher sent an unreadable status: {data[:200]!r}", 1


_supervising: set[asyncio.Task[None]] = set()
# Pids of children some ProcessHandle will reap itself: a subreaper's sweep of other orphans
# must leave these alone (see shim.py).
_own_children: set[int] = set()


def own_children() -> frozenset[int]:
    """Pids of started processes not yet reaped by their handle."""
    return frozenset(_own_children)


class ProcessHandle:
    """A running (or finished) local process started by `launch()`.

    Signals go to the whole process group. After the program exits, every process left in its
    group (and in its memory cgroup) is killed, so nothing outlives the machine.
    """

    pid: int
    started_at: datetime

    def __init__(
        self,
        pid: int,
        started_at: datetime,
        name: str,
        *,
        cgroup: MemoryCgroup | None = None,
        stage_dir: Path | None = None,
    ) -> None:
        self.pid = pid
        self.started_at = started_at
        self.name = name
        self._cgroup = cgroup
        self._stage_dir = stage_dir
        self._exit: asyncio.Future[ProcessExit] = asyncio.get_running_loop().create_future()
        self._reaped = pid <= 0  # once reaped, the pid may be reused: never signal it again
        if pid > 0:
            _own_children.add(pid)
        self._requested_stop = False
        self._suspended = False
        self._oom_flag = False
        self._watchdog: RssWatchdog | None = None
        self._outputs: list[OutputPipeProtocol] = []
        self._status: asyncio.Future[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        # Set when a set-up step done from this side after a direct spawn failed (the process
        # was killed): reported like a launcher's set-up failure.
        self._setup_error: tuple[str, int] | None = None

    def __repr__(self) -> str:
        state = "exited" if self.exited else "running"
        return f"<ProcessHandle pid={self.pid} name={self.name!r} {state}>"

    @property
    def exited(self) -> bool:
        """True once the exit is known (wait() returns immediately)."""
        return self._exit.done()

    async def wait(self) -> ProcessExit:
        """Wait for the process to exit; every caller gets the same ProcessExit."""
        return await asyncio.shield(self._exit)

    async def stop(self, signal: int = signals.SIGINT, timeout: float = 5.0) -> ProcessExit:
        """Send `signal` to the group, wait up to `timeout` s, then SIGKILL it; requested_stop."""
        if not self._exit.done() and not self._reaped:
            self._requested_stop = True
            self._signal(signal)
            if self._suspended and signal not in (signals.SIGKILL, signals.SIGCONT):
                self.resume()  # a stopped process only acts on the signal once continued
            try:
                return await asyncio.wait_for(asyncio.shield(self._exit), timeout)
            except TimeoutError:
                self.kill()
        return await self.wait()

    def send_signal(self, signal: int) -> None:
        """Send `signal` to the process group; no-op once the process has exited."""
        self._signal(signal)

    def suspend(self) -> None:
        """Pause the group (SIGSTOP)."""
        self._suspended = True
        self._signal(signals.SIGSTOP)

    def resume(self) -> None:
        """Continue a suspended group (SIGCONT)."""
        self._suspended = False
        self._signal(signals.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the group now; the exit reports requested_stop=True."""
        if not self._reaped:
            self._requested_stop = True
        self._signal(signals.SIGKILL)

    def release(self) -> None:
        """The exit has been recorded by whoever consumes it (nothing to do in-process)."""

    def _signal(self, sig: int) -> None:
        if self._reaped or self._exit.done():
            return
        proc_spawn.signal_group(self.pid, sig)

    # -- wiring, used by launch() ------------------------------------------------------------

    async def _attach(self, files: dict[str, BinaryIO], on_output: OutputCallback) -> None:
        """Hand the read pipes to the event loop; each leaves `files` once a transport owns it."""
        loop = asyncio.get_running_loop()
        for stream in ("stdout", "stderr"):
            _, protocol = await loop.connect_read_pipe(
                _output_protocol_factory(LineSplitter(stream, on_output)), files[stream]
            )
            del files[stream]
            self._outputs.append(protocol)
        if "status" not in files:  # started directly: no launcher, so no status pipe
            return
        _, status = await loop.connect_read_pipe(CollectPipeProtocol, files["status"])
        del files["status"]
        self._status = status.done

    def _watch_memory(self, limit_bytes: int) -> None:
        self._watchdog = watchdog_for_running_loop()
        self._watchdog.watch(self.pid, limit_bytes, self._memory_exceeded)

    def _memory_exceeded(self) -> None:
        logger.info(
            "machine %s exceeded its memory limit; killing it",
            self.name or self.pid,
            extra={"action": "oom"},
        )
        self._oom_flag = True
        self._signal(signals.SIGKILL)

    def _start_supervising(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"jobrunner-supervise-{self.name or self.pid}"
        )
        # The event loop only keeps weak references to tasks.
        _supervising.add(self._task)
        self._task.add_done_callback(_supervising.discard)

    def _finish(self, result: ProcessExit) -> None:
        if not self._exit.done():
            self._exit.set_result(result)

    # -- after the exit -------------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            result = await self._follow()
        except Exception as exc:
            logger.exception(
                "supervising %s failed", self.name or self.pid, extra={"action": "supervise"}
            )
            result = ProcessExit(
                exit_code=_EXIT_UNKNOWN,
                signal=None,
                oom_killed=False,
                requested_stop=self._requested_stop,
                error=f"the local supervisor lost track of the process: {exc}",
                exited_at=utc_now(),
            )
        self._finish(result)

    async def _follow(self) -> ProcessExit:
        await proc_spawn.wait_exited(self.pid)
        # The main process is a zombie now, which keeps its pid (= the group id) reserved:
        # kill whatever is left of the group before reaping it.
        proc_spawn.signal_group(self.pid, signals.SIGKILL)
        if self._cgroup is not None:
            self._cgroup.kill_all()
        status = proc_spawn.reap(self.pid)
        self._reaped = True
        _own_children.discard(self.pid)
        exited_at = utc_now()
        if self._watchdog is not None:
            self._watchdog.unwatch(self.pid)
        await self._drain_output()
        setup = _parse_status(await self._status) if self._status is not None else None
        if setup is None and self._setup_error is not None:
            setup = self._setup_error
        oom = self._oom_flag or (self._cgroup is not None and self._cgroup.oom_kills() > 0)
        await self._remove_cgroup()
        if self._stage_dir is not None:
            with contextlib.suppress(OSError):
                self._stage_dir.rmdir()
        return self._exit_from(status, setup, oom, exited_at)

    async def _drain_output(self) -> None:
        pending: list[asyncio.Future[Any]] = [p.done for p in self._outputs]
        if self._status is not None:
            pending.append(self._status)
        _, late = await asyncio.wait(pending, timeout=OUTPUT_DRAIN_TIMEOUT)
        if late:
            logger.warning(
                "output pipes of %s still open after it exited (a process left its group); "
                "closing them",
                self.name or self.pid,
                extra={"action": "output"},
            )
            for protocol in self._outputs:
                protocol.close()
            await asyncio.wait(pending)

    async def _remove_cgroup(self) -> None:
        if self._cgroup is None:
            return
        for _ in range(40):
            self._cgroup.kill_all()
            if self._cgroup.remove():
                self._cgroup.root.remove_if_unused()
                return
            await asyncio.sleep(0.05)
        logger.warning(
            "could not remove memory cgroup %s", self._cgroup.path, extra={"action": "cgroup"}
        )

    def _exit_from(
        self, status: int | None, setup: tuple[str, int] | None, oom: bool, exited_at: datetime
    ) -> ProcessExit:
        sig: int | None = None
        if setup is not None:
            code = setup[1]
        elif status is None:
            code = _EXIT_UNKNOWN  # reaped by someone else (a foreign SIGCHLD handler)
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            code = 128 + sig
        else:
            code = os.WEXITSTATUS(status)
        return ProcessExit(
            exit_code=code,
            signal=sig,
            oom_killed=oom,
            requested_stop=self._requested_stop,
            error=setup[0] if setup else None,
            exited_at=exited_at,
        )


async def launch(
    spec: ProcessSpec,
    on_output: OutputCallback,
    *,
    memory_enforcement: MemoryEnforcement = "auto",
    start_timeout: float = START_TIMEOUT,
) -> ProcessHandle:
    """Start `spec` and return its handle once the program runs (or could not be started).

    A program that cannot be started (not found, a file that cannot be placed, ...) still gives a
    handle; its `wait()` returns a ProcessExit with `error` set. Raises ValueError for an invalid
    spec (empty argv, cpus or memory_mb below 1).
    """
    _validate(spec)
    cgroup = _memory_cgroup(spec, memory_enforcement)
    if not needs_launcher(spec):
        return await _launch_direct(spec, cgroup, on_output)
    stage_dir = Path(spec.workdir) / STAGE_DIR_NAME if spec.files else None
    started_at = utc_now()
    try:
        pid, pipes = proc_spawn.spawn_launcher()
    except OSError as exc:
        if cgroup is not None:
            cgroup.remove()
        return _not_started(spec, started_at, f"cannot start the local launcher: {exc}")
    handle = ProcessHandle(pid, started_at, spec.name, cgroup=cgroup, stage_dir=stage_dir)
    try:
        await _start(handle, pipes, spec, cgroup, on_output, start_timeout)
    except BaseException:
        handle.kill()  # cancelled or broken while starting: do not leave the process behind
        raise
    return handle


async def _start(
    handle: ProcessHandle,
    pipes: proc_spawn.LauncherPipes,
    spec: ProcessSpec,
    cgroup: MemoryCgroup | None,
    on_output: OutputCallback,
    start_timeout: float,
) -> None:
    loop = asyncio.get_running_loop()
    files: dict[str, BinaryIO] = {
        "spec": os.fdopen(pipes.spec, "wb", buffering=0),
        "stdout": os.fdopen(pipes.stdout, "rb", buffering=0),
        "stderr": os.fdopen(pipes.stderr, "rb", buffering=0),
        "status": os.fdopen(pipes.status, "rb", buffering=0),
    }
    try:
        await handle._attach(files, on_output)
        if spec.memory_mb is not None and cgroup is None:
            handle._watch_memory(spec.memory_mb * 1024 * 1024)
        writer, _ = await loop.connect_write_pipe(WritePipeProtocol, files["spec"])
        del files["spec"]
    finally:
        for leftover in files.values():  # only pipes no transport took over (after an error)
            leftover.close()
        handle._start_supervising()  # always, so the child is reaped whatever happens
    writer.write(_launcher_spec(spec, cgroup))
    writer.close()
    assert handle._status is not None
    done, _ = await asyncio.wait([handle._status], timeout=start_timeout)
    if not done:
        logger.warning(
            "machine %s did not finish starting within %.0f s; killing it",
            spec.name or handle.pid,
            start_timeout,
            extra={"action": "start"},
        )
        handle._signal(signals.SIGKILL)


def needs_launcher(spec: ProcessSpec) -> bool:
    """Whether the job needs a set-up step inside its own process before exec.

    Files (and volume mounts) go into a private mount namespace, which only the process itself
    can enter; everything else (cgroup, affinity, cwd, environment, signals) is done from here,
    so most machines start without an interpreter of their own.
    """
    return bool(spec.files) or bool(spec.mounts)


async def _launch_direct(
    spec: ProcessSpec, cgroup: MemoryCgroup | None, on_output: OutputCallback
) -> ProcessHandle:
    started_at = utc_now()
    # The job must be in its cgroup from its first instruction (a child it forks at once must
    # not escape the limit), and posix_spawn cannot place it there: so this process joins the
    # job's cgroup for the duration of the spawn, and the child is born inside it.
    joined = cgroup is not None and _enter_cgroup(cgroup)
    # Likewise the CPU affinity: this thread takes the job's mask for the spawn, so the job
    # never runs on other CPUs, not even before its first instruction.
    own_cpus = _narrow_cpus(spec.cpus)
    try:
        pid, pipes = proc_spawn.spawn_direct(
            list(spec.argv), job_environment(spec.env), str(spec.workdir)
        )
    except proc_spawn.SpawnFailure as failure:
        if cgroup is not None:
            cgroup.remove()
        return _not_started(spec, started_at, failure.message, failure.exit_code)
    except OSError as exc:
        if cgroup is not None:
            cgroup.remove()
        return _not_started(spec, started_at, f"cannot start the process: {exc}")
    finally:
        if own_cpus is not None:
            os.sched_setaffinity(0, own_cpus)
        if joined:
            assert cgroup is not None
            _leave_cgroup(cgroup)
    handle = ProcessHandle(pid, started_at, spec.name, cgroup=cgroup)
    # What could not be done through inheritance is done from here, right after the spawn.
    handle._setup_error = _set_up_from_parent(
        pid, None if own_cpus is not None else spec.cpus, None if joined else cgroup
    )
    if handle._setup_error is not None:
        proc_spawn.signal_group(pid, signals.SIGKILL)
    files: dict[str, BinaryIO] = {
        "stdout": os.fdopen(pipes.stdout, "rb", buffering=0),
        "stderr": os.fdopen(pipes.stderr, "rb", buffering=0),
    }
    try:
        await handle._attach(files, on_output)
        if spec.memory_mb is not None and cgroup is None:
            handle._watch_memory(spec.memory_mb * 1024 * 1024)
    except BaseException:
        handle.kill()
        raise
    finally:
        for leftover in files.values():
            leftover.close()
        handle._start_supervising()
    return handle


def _enter_cgroup(cgroup: MemoryCgroup) -> bool:
    """Move this process into `cgroup`; False when it may not (the job is moved after spawn)."""
    try:
        cgroup.procs_file.write_text(str(os.getpid()))
    except OSError:
        return False
    return True


def _leave_cgroup(cgroup: MemoryCgroup) -> None:
    """Move this process back to its own cgroup: the parent of the jobrunner cgroups."""
    home = cgroup.root.path.parent / "cgroup.procs"
    try:
        home.write_text(str(os.getpid()))
    except OSError as exc:
        logger.error(
            "cannot move the supervisor back to its cgroup %s: %s", home, exc,
            extra={"action": "cgroup"},
        )  # fmt: skip


def _narrow_cpus(cpus: int | None) -> set[int] | None:
    """Limit this thread to the job's first `cpus` CPUs; returns the mask to restore (None:
    nothing was changed, because no limit is asked or it failed: then it is set after)."""
    if not cpus:
        return None
    own = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, _job_cpus(own, cpus))
    except OSError:
        return None
    return own


def _job_cpus(allowed: set[int], cpus: int) -> list[int]:
    """`cpus` of the `allowed` CPUs, starting with the one this thread runs on.

    Starting there means the spawning thread need not migrate, and jobs spread over the CPUs
    instead of all being pinned to the first ones.
    """
    ordered = sorted(allowed)
    current = _current_cpu()
    if current in allowed:
        start = ordered.index(current)
        ordered = ordered[start:] + ordered[:start]
    return ordered[: max(1, cpus)]


_sched_getcpu: Callable[[], int] | None = None


def _current_cpu() -> int:
    global _sched_getcpu
    if _sched_getcpu is None:
        try:
            _sched_getcpu = ctypes.CDLL(None).sched_getcpu
        except (OSError, AttributeError):
            _sched_getcpu = lambda: -1  # noqa: E731 - no libc symbol: keep the sorted order
    assert _sched_getcpu is not None
    return int(_sched_getcpu())


def _set_up_from_parent(
    pid: int, cpus: int | None, cgroup: MemoryCgroup | None
) -> tuple[str, int] | None:
    """Join the memory cgroup and limit CPUs for `pid`; (error, exit code) when it fails."""
    if cgroup is not None:
        try:
            cgroup.procs_file.write_text(str(pid))
        except OSError as exc:
            return f"cannot join the memory cgroup {str(cgroup.procs_file)!r}: {exc}", 1
    if cpus:
        allowed = sorted(os.sched_getaffinity(0))
        try:
            os.sched_setaffinity(pid, allowed[: max(1, cpus)])
        except OSError as exc:
            return f"cannot limit the process to {cpus} CPU(s): {exc}", 1
    return None


def _not_started(
    spec: ProcessSpec, started_at: datetime, error: str, exit_code: int = 1
) -> ProcessHandle:
    handle = ProcessHandle(0, started_at, spec.name)
    handle._finish(
        ProcessExit(
            exit_code=exit_code,
            signal=None,
            oom_killed=False,
            requested_stop=False,
            error=error,
            exited_at=utc_now(),
        )
    )
    return handle
