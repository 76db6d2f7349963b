"""Finding and ending the machine shim of a test's state dir (jobrunner/local/process/shim.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from jobrunner.local.daemon import wait_shim_gone


def shim_pids(state_dir: Path) -> list[int]:
    """Live shim processes serving ``state_dir`` (from /proc)."""
    wanted = [b"jobrunner.local.process.shim", str(state_dir).encode()]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if all(part in argv for part in wanted) and stat[stat.rindex(")") + 2] not in "ZX":
            found.append(int(entry.name))
    return found


def eventually(condition: Callable[[], bool], within: float = 30.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``within`` seconds pass (False)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def end_shim(state_dir: Path, within: float = 30.0) -> bool:
    """Wait for the shim to exit by itself; SIGKILL it (and its jobs' groups) if it does not.

    Returns True when it exited by itself. Always leaves no shim behind.
    """
    if wait_shim_gone(state_dir, timeout=within):
        return True
    for pid in shim_pids(state_dir):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in map(int, children):
            with contextlib.suppress(OSError):
                os.killpg(child, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
    wait_shim_gone(state_dir, timeout=10)
    return False
