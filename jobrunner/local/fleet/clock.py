"""A clock for the local backend that tests move by hand.

Everything in the server that reasons about wall time (event timestamps, lease expiry, the
``schedule`` intervals, the retention of destroyed machines) reads it through jobrunner's one
``Clock`` (jobrunner/clock.py). With ``FakeClock`` a test can run a month of daily schedule in
seconds: ``advance()`` moves time and wakes every ``sleep`` whose deadline has passed. Wait
timeouts and stop grace periods are about real HTTP clients and real processes, so they use
real time, never this clock.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta

from jobrunner.clock import Clock

__all__ = ["FakeClock"]


class FakeClock(Clock):
    """A clock that only moves when ``advance`` is called (from the event loop's thread).

    Sleepers are kept in a heap by deadline; ``advance`` resolves the ones that are due, in order.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> datetime:
        return self._now

    def time(self) -> float:
        return self._now.timestamp()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        deadline = self._now + timedelta(seconds=seconds)
        heapq.heappush(self._sleepers, (deadline, next(self._order), future))
        await future

    def advance(self, seconds: float) -> datetime:
        """Move time forward by ``seconds`` and wake every sleeper that is now due."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards (advance by {seconds} s)")
        self._now += timedelta(seconds=seconds)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
        return self._now
