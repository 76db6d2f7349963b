"""The wait endpoint (fly-machines-api.md section 5): long-polls on a machine's state.

A waiter sleeps on the machine's change event (no thread, no polling) and re-checks on every
change. It also looks at the machine's recent transitions, so a state the machine only passed
through (``stopped`` on the way to ``destroyed``) still satisfies a waiter that was already
waiting; with ``from_event_id`` only transitions after that event count.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from jobrunner.local.api.errors import ApiError, bad_request, not_found
from jobrunner.local.fleet.records import MachineRecord
from jobrunner.local.fleet.registry import Registry

__all__ = ["SETTLED_STATES", "WAIT_STATES", "WaitRequest", "parse_wait_query", "wait_until_state"]

WAIT_STATES = ("started", "stopped", "suspended", "destroyed", "settled")
# "settled": any state that is not on its way to another (FC's `fly machine wait` default).
SETTLED_STATES = frozenset(
    {"created", "started", "stopped", "suspended", "destroyed", "failed", "replaced"}
)
MAX_TIMEOUT = 60


@dataclass(frozen=True)
class WaitRequest:
    states: tuple[str, ...]
    timeout: int
    instance_id: str | None
    from_event_id: str | None


def parse_wait_query(
    states: Sequence[str],
    timeout: str | None,
    instance_id: str | None,
    version: str | None,
    from_event_id: str | None,
) -> WaitRequest:
    """Validate the query; ``state`` may repeat (fly-go) or be comma-separated."""
    wanted: list[str] = []
    for value in states:
        wanted.extend(part.strip() for part in value.split(",") if part.strip())
    for state in wanted:
        if state not in WAIT_STATES:
            raise bad_request(
                f"state {state!r} cannot be waited for: use one of {', '.join(WAIT_STATES)}"
            )
    seconds = MAX_TIMEOUT
    if timeout is not None:
        try:
            seconds = int(timeout)
        except ValueError:
            raise bad_request(
                f"timeout {timeout!r} must be a whole number of seconds from 1 to {MAX_TIMEOUT}"
            ) from None
        if not 1 <= seconds <= MAX_TIMEOUT:
            raise bad_request(f"timeout must be between 1 and {MAX_TIMEOUT} seconds, got {seconds}")
    return WaitRequest(
        states=tuple(dict.fromkeys(wanted or ["started"])),
        timeout=seconds,
        instance_id=instance_id or version or None,
        from_event_id=from_event_id or None,
    )


async def wait_until_state(
    registry: Registry, machine: MachineRecord, request: WaitRequest
) -> None:
    """Return when the machine reaches a wanted state; raise 404, 408 or 503 otherwise."""
    runtime = registry.runtime(machine)
    wanted = set(request.states)
    instance_id = request.instance_id
    if instance_id is not None and instance_id != machine.instance_id:
        if not any(v.version == instance_id and v.replaced for v in machine.versions):
            raise bad_request(
                f"instance_id {instance_id} is not a version of machine {machine.id} "
                f"(its current instance_id is {machine.instance_id})"
            )
        if wanted & {"stopped", "settled"}:
            return  # an instance that has been replaced has stopped for good
    baseline: int | None = None
    if request.from_event_id is not None:
        baseline = next(
            (e.seq for e in machine.events if e.event.id == request.from_event_id), None
        )
        if baseline is None:
            raise bad_request(
                f"from_event_id {request.from_event_id} is not an event of {machine.id}"
            )
    since = baseline if baseline is not None else machine.next_seq - 1
    loop = asyncio.get_running_loop()
    deadline = loop.time() + request.timeout
    while True:
        if registry.closing:
            raise ApiError(503, "the local backend is shutting down: retry once it is back")
        if _current_matches(machine, wanted, instance_id, baseline) or any(
            t.seq > since and _matches(t.state, wanted) and instance_id in (None, t.instance_id)
            for t in runtime.transitions
        ):
            return
        if machine.state == "destroyed":
            raise not_found(f"machine not found: {machine.id} was destroyed")
        remaining = deadline - loop.time()
        if remaining <= 0:
            current = machine.state
            if instance_id not in (None, machine.instance_id):
                current = "replaced"
            raise ApiError(
                408,
                "machine failed to reach desired state, "
                f"{','.join(request.states)}, currently {current}",
            )
        changed = runtime.changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), remaining)


def _matches(state: str, wanted: set[str]) -> bool:
    return state in wanted or ("settled" in wanted and state in SETTLED_STATES)


def _current_matches(
    machine: MachineRecord, wanted: set[str], instance_id: str | None, baseline: int | None
) -> bool:
    if baseline is not None and machine.state_seq <= baseline:
        return False  # entered before the event the caller named
    state = machine.state
    if state != "destroyed" and instance_id not in (None, machine.instance_id):
        return False
    if state == "created" and not machine.boot_pending and "stopped" in wanted:
        return True  # created with skip_launch: not running, as flyctl's release command expects
    return _matches(state, wanted)
