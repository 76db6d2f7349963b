"""The one place jobrunner reads time or sleeps, so tests can swap in a fake clock.

The Machines client (retries, rate limits, the wait loop), the runner (timeouts, backoff) and the
store (timestamps it writes) all take a ``Clock``. The default reads the real clocks and sleeps with
``asyncio.sleep``; a test passes a clock whose ``sleep`` only moves its own time forward.

Claims that processes on several hosts compare are the exception: the store stamps those with the
database server's time on PostgreSQL, so hosts with skewed clocks still agree on who holds a run.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

__all__ = ["SYSTEM_CLOCK", "Clock"]


class Clock:
    """Monotonic time for deadlines, wall time for records, and an async sleep."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (used for deadlines and buckets)."""
        return time.monotonic()

    def time(self) -> float:
        """Unix seconds."""
        return time.time()

    def now(self) -> datetime:
        """The current time as a timezone-aware UTC datetime."""
        return datetime.fromtimestamp(self.time(), UTC)

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` without blocking the event loop."""
        await asyncio.sleep(max(0.0, seconds))


SYSTEM_CLOCK = Clock()
