"""Cleaning up after a crashed server: is a recorded pid still ours, and killing its group.

Used for machines whose supervisor died: the shim normally outlives the API server and the
server re-adopts its machines, but when the shim itself died (or the server runs without one),
nobody holds the pipes to those processes or can learn their exit, so they are killed.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime
from pathlib import Path

from jobrunner.local.process import spawn as proc_spawn
from jobrunner.local.process.cgroup import MemoryCgroup, find_cgroup_root

__all__ = ["kill_orphan_group", "pid_alive"]


def pid_alive(pid: int, started_at: datetime | None = None) -> bool:
    """Whether `pid` is a live (non-zombie) process.

    With `started_at` (the handle's), a pid that now belongs to a newer process counts as dead.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if proc_spawn.process_state(pid) in ("Z", "X"):
        return False
    return started_at is None or proc_spawn.started_near(pid, started_at)


def kill_orphan_group(pid: int, started_at: datetime | None = None) -> None:
    """SIGKILL the process group `pid` left by a crashed server (and its memory cgroup's members).

    With `started_at`, nothing is killed when `pid` now belongs to a newer process (the old group
    cannot exist any more then, as Linux does not reuse a pid still used as a group id).
    """
    if pid <= 1:
        raise ValueError(f"refusing to kill process group {pid}")
    if (
        started_at is not None
        and proc_spawn.process_start_time(pid) is not None
        and not proc_spawn.started_near(pid, started_at)
    ):
        return
    cgroup = _orphan_cgroup(pid)
    proc_spawn.signal_group(pid, signal.SIGKILL)
    if cgroup is not None:
        for _ in range(25):  # killed processes take a moment to leave the cgroup
            cgroup.kill_all()
            if cgroup.remove():
                cgroup.root.remove_if_unused()
                break
            time.sleep(0.02)


def _orphan_cgroup(pid: int) -> MemoryCgroup | None:
    """The jobrunner memory cgroup `pid` is in, if any."""
    root, _ = find_cgroup_root()
    if root is None:
        return None
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        wanted = "memory" in controllers.split(",") if root.version == 1 else controllers == ""
        candidate = Path(path).name
        if wanted and (root.path / candidate).is_dir() and Path(path).parent.name == "jobrunner":
            return MemoryCgroup(root.path / candidate, root.version)
    return None
