"""A client-side rate limiter that keeps us under Fly's documented Machines API limits.

Fly documents (fly-machines-api.md section 9) 1 request/s per action with bursts of 3, scoped to
the machine or the app, and 5 requests/s with bursts of 10 for "get machine". Going over gets
429s, which cost a retry each, so the client spaces its own calls instead. One token bucket per
(action, scope): creates and app calls are scoped by app, machine calls by machine id.

Only "get machine" has the documented 5/s-burst-10 limit. Every other action, reads such as
list, events, lease, metadata and apps included, uses 1/s-burst-3: the docs give a higher limit
to get machine alone, and a looser guess here would let the runner's own load cause 429s. Not
limited here: ``wait`` (a long poll that holds one request open for up to 60 s, so it cannot be
"fast") and the logs API (another service on another host, with its own polling cadence).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from jobrunner.machines.clock import SYSTEM_CLOCK, Clock

__all__ = [
    "READ_ACTIONS",
    "READ_LIMIT",
    "WRITE_LIMIT",
    "Limit",
    "Limiter",
    "RateLimiter",
    "SharedRateLimiter",
    "TakeToken",
    "TokenBucket",
]


@dataclass(frozen=True)
class Limit:
    """A steady ``rate`` (requests per second) and the ``burst`` allowed on top of idle time."""

    rate: float
    burst: int


WRITE_LIMIT = Limit(rate=1.0, burst=3)
READ_LIMIT = Limit(rate=5.0, burst=10)
# The actions with the higher limit: only "get machine" is documented with one.
READ_ACTIONS = frozenset({"get"})

# Float arithmetic may leave 0.9999999 tokens after sleeping exactly long enough for one.
_EPSILON = 1e-9
# Beyond this many buckets, idle (full) ones are dropped so tracking many machines stays small.
_MAX_IDLE_BUCKETS = 1024


class TokenBucket:
    """Holds up to ``burst`` tokens, refilled at ``rate`` per second; each request takes one."""

    def __init__(self, limit: Limit, clock: Clock) -> None:
        self.limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._updated = clock.monotonic()
        self._lock: asyncio.Lock | None = None

    def _refill(self) -> None:
        now = self._clock.monotonic()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.limit.burst), self._tokens + elapsed * self.limit.rate)
        self._updated = now

    @property
    def idle(self) -> bool:
        """Full and nobody waiting: forgetting this bucket changes nothing."""
        self._refill()
        busy = self._lock is not None and self._lock.locked()
        return not busy and self._tokens >= self.limit.burst - _EPSILON

    async def acquire(self) -> None:
        """Take one token, sleeping until one is there. Waiters are served first come first."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        # Holding the lock while sleeping queues later callers behind this one, in order.
        async with self._lock:
            while True:
                self._refill()
                if self._tokens >= 1.0 - _EPSILON:
                    self._tokens -= 1.0
                    return
                await self._clock.sleep((1.0 - self._tokens) / self.limit.rate)


class RateLimiter:
    """Token buckets keyed by (action, scope), created on first use."""

    def __init__(
        self,
        clock: Clock = SYSTEM_CLOCK,
        *,
        limits: Mapping[str, Limit] | None = None,
        default: Limit = WRITE_LIMIT,
    ) -> None:
        self._clock = clock
        self._limits = (
            dict(limits) if limits is not None else dict.fromkeys(READ_ACTIONS, READ_LIMIT)
        )
        self._default = default
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def limit_for(self, action: str) -> Limit:
        """The limit that applies to ``action``."""
        return self._limits.get(action, self._default)

    async def acquire(self, action: str, scope: str) -> None:
        """Wait until one more ``action`` on ``scope`` (an app name or machine id) is allowed."""
        key = (action, scope)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_IDLE_BUCKETS:
                self._forget_idle()
            bucket = self._buckets[key] = TokenBucket(self.limit_for(action), self._clock)
        await bucket.acquire()

    def _forget_idle(self) -> None:
        for key in [key for key, bucket in self._buckets.items() if bucket.idle]:
            del self._buckets[key]


class Limiter(Protocol):
    """What the client asks before each limited call."""

    async def acquire(self, action: str, scope: str) -> None: ...


# (bucket key, rate per second, burst) -> seconds to wait before the call may go. The bucket is
# kept elsewhere (the run ledger), so every process that shares it shares the limit.
TakeToken = Callable[[str, float, int], Awaitable[float]]


class SharedRateLimiter:
    """Fly's limits held for all processes together: the token buckets live in a shared store
    (the run ledger's ``rate_buckets`` table), not in this process.

    Eight ``jobrunner run`` processes, or three workers, each with their own buckets would
    together go over Fly's create limit; with one shared bucket per (action, app or machine)
    they take turns. Each call reserves its token in one transaction and sleeps until its turn.
    """

    def __init__(
        self,
        take: TakeToken,
        clock: Clock = SYSTEM_CLOCK,
        *,
        limits: Mapping[str, Limit] | None = None,
        default: Limit = WRITE_LIMIT,
    ) -> None:
        self._take = take
        self._clock = clock
        self._limits = (
            dict(limits) if limits is not None else dict.fromkeys(READ_ACTIONS, READ_LIMIT)
        )
        self._default = default

    async def acquire(self, action: str, scope: str) -> None:
        limit = self._limits.get(action, self._default)
        delay = await self._take(f"{action}:{scope}", limit.rate, limit.burst)
        if delay > 0:
            await self._clock.sleep(delay)
