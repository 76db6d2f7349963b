"""The wait loop: wait any length of time for a machine state with the API's <=60 s long polls.

One ``GET .../wait`` holds for at most 60 s and answers 408 when time runs out, so a longer wait
is a series of polls of ``min(remaining, 60)`` seconds until the caller's own deadline
(fly-machines-api.md section 5). A 404 needs care (sections 4 and 11):

* right after a create the machine may not be visible yet (the API is eventually consistent), so
  a 404 within ``not_found_grace`` seconds of the first poll is retried with backoff;
* a one-off machine with ``auto_destroy`` may already have run and been destroyed; a GET still
  returns it for a while. Then waiting for "destroyed", "stopped" or "settled" has succeeded,
  while waiting for "started" never will: ``MachineDestroyed`` carries the machine, and its
  ``exit_code`` says how the job ended.

400 is final. Transient errors (no answer, 429, 502/503/504) are retried here, not by each
poll: a wait may last hours, and a short outage in the middle must not end it, so the retry
policy's ``max_total`` bounds each *streak* of failures (counted from its first failure) rather
than the whole wait; the backoff (and ``Retry-After``) come from the same policy. An answer (a
408 or a 404) ends the streak.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence

from jobrunner.machines.clock import Clock
from jobrunner.machines.errors import MachineDestroyed, MachinesError, NotFound, WaitTimeout
from jobrunner.machines.models import Machine, WaitState
from jobrunner.machines.retry import RequestRetryPolicy, is_transient

__all__ = [
    "DEFAULT_NOT_FOUND_GRACE",
    "MAX_POLL_SECONDS",
    "check_wait_timeout",
    "normalize_states",
    "poll_seconds",
    "wait_for_state",
]

log = logging.getLogger(__name__)

MAX_POLL_SECONDS = 60
DEFAULT_NOT_FOUND_GRACE = 10.0
# A destroyed machine has passed through (or ended in) these, so waiting for them has succeeded.
_REACHED_WHEN_DESTROYED = frozenset({"destroyed", "stopped", "settled"})
_GONE_STATES = frozenset({"destroyed", "destroying"})
_VALID_STATES = frozenset({"started", "stopped", "suspended", "destroyed", "settled"})
# Backoff between polls after a 404 (before the machine is visible), as flyctl does.
_NOT_FOUND_FIRST_DELAY = 0.5
_NOT_FOUND_MAX_DELAY = 2.0
# A 408 that comes back at once must not turn the loop into a busy loop.
_MIN_POLL_INTERVAL = 1.0


def normalize_states(state: WaitState | Sequence[WaitState]) -> tuple[WaitState, ...]:
    """One state or several as a tuple; an unknown or empty choice is a ValueError."""
    states: tuple[WaitState, ...] = (state,) if isinstance(state, str) else tuple(state)
    if not states:
        raise ValueError("wait needs at least one state, e.g. 'started'")
    unknown = [s for s in states if s not in _VALID_STATES]
    if unknown:
        raise ValueError(
            f"cannot wait for state(s) {unknown}; choose from {', '.join(sorted(_VALID_STATES))}"
        )
    return states


def check_wait_timeout(name: str, value: float) -> None:
    """Refuse a NaN duration at once: it would make every deadline comparison false.

    A negative value is allowed and acts as 0 (one poll), so a caller passing "time left"
    does not fail just because that time has run out.
    """
    if math.isnan(value):
        raise ValueError(f"wait {name} must be a number of seconds (math.inf: no limit), got nan")


def poll_seconds(remaining: float) -> int:
    """The ``timeout`` query value for one poll: whole seconds in [1, 60]."""
    return max(1, min(MAX_POLL_SECONDS, math.ceil(min(remaining, MAX_POLL_SECONDS))))


async def wait_for_state(
    *,
    machine_id: str,
    states: tuple[WaitState, ...],
    timeout: float,
    not_found_grace: float,
    clock: Clock,
    poll: Callable[[int], Awaitable[None]],
    get_machine: Callable[[], Awaitable[Machine]],
    path: str,
    retry: RequestRetryPolicy,
) -> None:
    """Poll until one of ``states`` is reached, or raise (see the module docstring).

    ``poll(seconds)`` is one long poll (a single try) that returns on 200 and raises the mapped
    error otherwise; ``get_machine()`` GETs the machine; ``path`` names the wait URL in errors;
    ``retry`` gives the backoff and the longest streak of transient failures to sit out.
    """
    started = clock.monotonic()
    deadline = started + timeout
    not_found_delay = _NOT_FOUND_FIRST_DELAY
    last_timeout: WaitTimeout | None = None
    polls = 0
    failing_since: float | None = None  # when the current streak of transient failures began
    failures = 0
    while True:
        poll_started = clock.monotonic()
        remaining = deadline - poll_started
        # Always poll once, so timeout=0 means "is it there now?" rather than an instant failure.
        if remaining <= 0 and polls > 0:
            raise _overall_timeout(machine_id, states, timeout, path, last_timeout)
        polls += 1
        try:
            await poll(poll_seconds(remaining))
            return
        except WaitTimeout as exc:
            failing_since = None
            last_timeout = exc
            too_soon = _MIN_POLL_INTERVAL - (clock.monotonic() - poll_started)
            if too_soon > 0:
                await clock.sleep(min(too_soon, max(0.0, deadline - clock.monotonic())))
        except NotFound as exc:
            failing_since = None
            machine = await _get_or_none(get_machine)
            if machine is not None and machine.state in _GONE_STATES:
                if _REACHED_WHEN_DESTROYED.intersection(states):
                    return
                raise MachineDestroyed(
                    machine=machine, wanted=states, method=exc.method, path=exc.path
                ) from exc
            if clock.monotonic() - started >= not_found_grace:
                raise
            await clock.sleep(min(not_found_delay, max(0.0, deadline - clock.monotonic())))
            not_found_delay = min(not_found_delay * 2, _NOT_FOUND_MAX_DELAY)
        except MachinesError as exc:
            if not is_transient(exc):
                raise
            now = clock.monotonic()
            # Counted from the failure, not the poll's start: a long poll that is dropped after
            # 60 s has not been failing for 60 s.
            if failing_since is None:
                failing_since, failures = now, 0
            failures += 1
            delay = retry.delay_after(failures, exc)
            if now + delay - failing_since > retry.max_total or now + delay >= deadline:
                raise
            log.warning(
                "waiting for machine %s: polling again in %.2f s after: %s",
                machine_id,
                delay,
                exc,
                extra={"action": "machines.wait.retry"},
            )
            await clock.sleep(delay)


async def _get_or_none(get_machine: Callable[[], Awaitable[Machine]]) -> Machine | None:
    try:
        return await get_machine()
    except NotFound:
        return None


def _overall_timeout(
    machine_id: str,
    states: tuple[WaitState, ...],
    timeout: float,
    path: str,
    last: WaitTimeout | None,
) -> WaitTimeout:
    error = f"machine {machine_id} did not reach {'/'.join(states)} within {timeout:g} s"
    if last is not None and last.error:
        error += f" (last answer: {last.error})"
    return WaitTimeout(
        status_code=408,
        method="GET",
        path=path,
        error=error,
        request_id=last.request_id if last is not None else None,
    )
