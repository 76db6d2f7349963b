"""Low-level process plumbing for the supervisor: spawning the launcher, noticing exits, pids.

No threads anywhere: the launcher is started with posix_spawn (vfork-like, so a large server
process is not copied), exits are noticed through a pidfd registered with the event loop (or,
on kernels without pidfd_open, a cheap WNOHANG poll), and pipes are read by the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

__all__ = [
    "LauncherPipes",
    "launcher_command",
    "process_start_time",
    "process_state",
    "reap",
    "signal_group",
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
            file_actions=[(os.POSIX_SPAWN_DUP2, fd, slot) for slot, fd in enumerate(child_ends)],
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
