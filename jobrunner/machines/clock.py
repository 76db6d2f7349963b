"""The one place the client reads time or sleeps, so tests can swap in a fake clock.

Retries, the rate limiter, the wait loop and log following all take a ``Clock``. The default
reads the real monotonic and wall clocks and sleeps with ``asyncio.sleep``; tests pass a clock
whose ``sleep`` only moves its own time forward, so no test really waits.
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["SYSTEM_CLOCK", "Clock"]


class Clock:
    """Monotonic time for deadlines, wall time for ``Retry-After`` dates, and an async sleep."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (used for deadlines and buckets)."""
        return time.monotonic()

    def time(self) -> float:
        """Unix seconds (used only to turn an HTTP date into a delay)."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` without blocking the event loop."""
        await asyncio.sleep(max(0.0, seconds))


SYSTEM_CLOCK = Clock()
