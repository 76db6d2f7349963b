"""Fallback memory limit: one asyncio task samples the RSS of every watched process group.

Used when memory cgroups are unavailable. Every `interval` seconds it reads /proc/<pid>/stat once
per process on the system (one scan for all watched groups, not one per machine), sums the
resident memory per process group and calls `on_exceeded` for every group over its limit. This is
coarser than a cgroup: a process can overshoot for up to one interval, and shared pages count once
per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RssWatchdog", "group_rss_bytes", "watchdog_for_running_loop"]

logger = logging.getLogger(__name__)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def group_rss_bytes() -> dict[int, int]:
    """Resident memory in bytes summed per process group, for every process we can read."""
    totals: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue  # exited while we looked
        # Fields after the command name (which may contain spaces and parentheses):
        # state ppid pgrp session ... rss is the 24th field overall, index 21 here.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 21:
            pgrp = int(fields[2])
            totals[pgrp] = totals.get(pgrp, 0) + int(fields[21]) * _PAGE_SIZE
    return totals


@dataclass
class _Watch:
    limit_bytes: int
    on_exceeded: Callable[[], None]


class RssWatchdog:
    """Enforces per-process-group memory limits by polling; see the module docstring."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._watches: dict[int, _Watch] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, pgid: int, limit_bytes: int, on_exceeded: Callable[[], None]) -> None:
        """Start enforcing `limit_bytes` on the group; `on_exceeded` is called at most once."""
        self._watches[pgid] = _Watch(limit_bytes, on_exceeded)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="jobrunner-rss-watchdog"
            )

    def unwatch(self, pgid: int) -> None:
        """Stop enforcing the group's limit (its process exited)."""
        self._watches.pop(pgid, None)

    def check_once(self) -> None:
        """One sample: call `on_exceeded` for every group over its limit."""
        if not self._watches:
            return
        usage = group_rss_bytes()
        for pgid, watch in list(self._watches.items()):
            if usage.get(pgid, 0) > watch.limit_bytes:
                del self._watches[pgid]
                try:
                    watch.on_exceeded()
                except Exception:
                    logger.exception(
                        "memory watchdog callback failed for group %d",
                        pgid,
                        extra={"action": "oom"},
                    )

    async def _run(self) -> None:
        while self._watches:
            self.check_once()
            await asyncio.sleep(self.interval)

    async def aclose(self) -> None:
        """Stop the sampling task (tests; normally it ends by itself when nothing is watched)."""
        self._watches.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RssWatchdog] = (
    weakref.WeakKeyDictionary()
)


def watchdog_for_running_loop() -> RssWatchdog:
    """The shared watchdog of the running event loop (one scan serves every machine)."""
    loop = asyncio.get_running_loop()
    dog = _per_loop.get(loop)
    if dog is None:
        dog = _per_loop[loop] = RssWatchdog()
    return dog
