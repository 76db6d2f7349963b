"""When and how the client repeats a failed call.

Which failures are transient: a connection error with no answer (refused, reset, timed out,
dropped), 429, 502, 503 and 504. 400, 401, 404, 409, 422 and every other status are final.
"insufficient_capacity" is final too, whatever its HTTP code: retrying at once rarely helps,
and the caller may prefer another region.

Which calls are retried on a transient failure (the idempotency rule): a call is retried when
doing it twice leaves things as doing it once would.

* Idempotent, so retried on every transient failure: every GET (apps, machines, events, lease,
  metadata, versions, ps, logs), ``delete_machine``, ``delete_app``, ``delete_metadata``,
  ``set_metadata``, ``release_lease``, ``stop_machine``, ``suspend_machine``,
  ``start_machine``, ``cordon``/``uncordon``, and ``acquire_lease`` when refreshing (a nonce
  is given). A repeat after a lost success may answer differently (a second delete of a gone
  machine is a 404); that error is raised as it is.
* Not idempotent: ``update_machine`` (a new version each time), ``restart_machine`` (two
  restarts), ``signal_machine`` (a second SIGHUP is a second reload), ``exec_machine`` (the
  command would run twice), ``create_app`` and a fresh ``acquire_lease`` (a retry would meet
  our own lease as a 409). These are retried only when nothing can have happened: a 429, or a
  connection that was never made.
* ``create_machine`` has its own rule, so that it never makes two machines: see ``create.py``.
* ``wait`` retries the same transient failures in its own loop (wait.py), where ``max_total``
  bounds each streak of failures instead of the whole call, so an hour-long wait survives a
  short outage.

Backoff: exponential, ``base_delay * 2**(attempt-1)`` capped at ``max_delay``, with **equal
jitter** by default (half the delay fixed, half random) so that a retry never comes sooner than
half the nominal delay yet clients that failed together spread out. ``jitter="full"`` draws the
whole delay at random. A ``Retry-After`` header (seconds or HTTP date) replaces the computed
delay. Bounds: at most ``max_attempts`` tries, and no sleep that would end more than
``max_total`` seconds after the first try; when either bound is hit the last error is raised.
"""

from __future__ import annotations

import logging
import random as _random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from jobrunner.machines.clock import Clock
from jobrunner.machines.errors import (
    InsufficientCapacity,
    MachinesAPIError,
    MachinesConnectionError,
    MachinesError,
    RateLimited,
)

__all__ = [
    "NO_RETRY",
    "RequestRetryPolicy",
    "is_transient",
    "nothing_happened",
    "retry_call",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RequestRetryPolicy:
    """How often and how long to retry; see the module docstring for what is retried."""

    max_attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 8.0
    max_total: float = 60.0
    jitter: Literal["equal", "full"] = "equal"
    # A source of numbers in [0, 1) for the jitter; tests pass a constant to get exact delays.
    rng: Callable[[], float] = field(default=_random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if min(self.base_delay, self.max_delay, self.max_total) < 0:
            raise ValueError("base_delay, max_delay and max_total must not be negative")

    def backoff(self, attempt: int) -> float:
        """The jittered delay after failed try number ``attempt`` (1-based)."""
        # The exponent is capped so a huge max_attempts cannot overflow the float.
        nominal = min(self.max_delay, self.base_delay * 2.0 ** min(attempt - 1, 64))
        if self.jitter == "full":
            return nominal * self.rng()
        return nominal / 2 + nominal / 2 * self.rng()

    def delay_after(self, attempt: int, exc: MachinesError) -> float:
        """The server's ``Retry-After`` when it sent one, else the jittered backoff."""
        retry_after = exc.retry_after if isinstance(exc, MachinesAPIError) else None
        return retry_after if retry_after is not None else self.backoff(attempt)

    def next_delay(self, attempt: int, exc: MachinesError, elapsed: float) -> float | None:
        """How long to sleep before another try, or None when the bounds allow no more.

        ``attempt`` is the number of the try that just failed, ``elapsed`` the seconds since the
        first try began.
        """
        if attempt >= self.max_attempts:
            return None
        delay = self.delay_after(attempt, exc)
        return None if elapsed + delay > self.max_total else delay


NO_RETRY = RequestRetryPolicy(max_attempts=1)


def is_transient(exc: MachinesError) -> bool:
    """True for failures worth repeating an idempotent call for."""
    if isinstance(exc, MachinesConnectionError):
        return exc.retryable
    if isinstance(exc, InsufficientCapacity):
        return False
    return isinstance(exc, MachinesAPIError) and exc.status_code in TRANSIENT_STATUSES


def nothing_happened(exc: MachinesError) -> bool:
    """True when the server certainly did not act, so even a non-idempotent call may repeat."""
    if isinstance(exc, RateLimited):
        return True
    return isinstance(exc, MachinesConnectionError) and exc.retryable and not exc.request_sent


async def retry_call(
    op: Callable[[], Awaitable[T]],
    *,
    policy: RequestRetryPolicy,
    clock: Clock,
    should_retry: Callable[[MachinesError], bool],
    what: str,
) -> T:
    """Run ``op`` until it succeeds, a failure is final, or the policy's bounds are reached."""
    started = clock.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await op()
        except MachinesError as exc:
            if not should_retry(exc):
                raise
            delay = policy.next_delay(attempt, exc, clock.monotonic() - started)
            if delay is None:
                raise
            log.warning(
                "retrying %s in %.2f s after try %d of %d failed: %s",
                what,
                delay,
                attempt,
                policy.max_attempts,
                exc,
                extra={"action": "machines.retry"},
            )
            await clock.sleep(delay)
