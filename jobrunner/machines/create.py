"""Creating a machine without ever making two: the submit id and the look-before-retry rule.

Fly has no idempotency key for ``POST /machines``, and a create whose answer was lost (timeout,
dropped connection, 408, 5xx) may or may not have made a machine. Blindly retrying could start a
job twice. So:

1. Every create carries a unique submit id in ``config.metadata["jobrunner_submit_id"]`` (other
   metadata is kept; a submit id the caller already set is kept too, so a caller can resume its
   own earlier attempt).
2. After an **ambiguous** failure (no answer after the request was sent, 408, any 5xx other
   than "insufficient_capacity") the client backs off, then lists machines with
   ``metadata.jobrunner_submit_id=<id>`` and ``include_deleted=true``. If one is there, it is
   ours: it is fetched and returned. If not, the create is sent again (bounded by the retry
   policy's attempts and total time).
3. An **unambiguous** failure means nothing was made: a 429 or a connection that was never
   made is retried after the backoff (or ``Retry-After``); any other 4xx and
   "insufficient_capacity" are raised at once.
4. A 422 "name_taken" after an earlier ambiguous try is most likely our own machine holding the
   name, so it is looked up too before being raised.

When the attempts run out after an ambiguous failure, the look-up has still been done; the error
raised carries a note with the submit id, so the caller can reconcile later.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from jobrunner.machines._requests import config_from
from jobrunner.machines.clock import Clock
from jobrunner.machines.errors import (
    InsufficientCapacity,
    MachinesAPIError,
    MachinesConnectionError,
    MachinesError,
    ValidationFailed,
)
from jobrunner.machines.models import Machine, MachineConfig
from jobrunner.machines.retry import RequestRetryPolicy, nothing_happened

__all__ = [
    "SUBMIT_ID_KEY",
    "create_without_duplicates",
    "is_ambiguous",
    "submit_id_of",
    "tag_config",
]

SUBMIT_ID_KEY = "jobrunner_submit_id"
log = logging.getLogger(__name__)


def tag_config(config: MachineConfig | Mapping[str, Any]) -> tuple[MachineConfig, str]:
    """A copy of ``config`` carrying a submit id in its metadata, and that id.

    The caller's object is never changed.
    """
    if isinstance(config, MachineConfig):
        tagged = config.model_copy(deep=True)
    else:
        tagged = config_from(config, what="create machine")
    metadata = dict(tagged.metadata or {})
    submit_id = metadata.get(SUBMIT_ID_KEY) or uuid.uuid4().hex
    metadata[SUBMIT_ID_KEY] = submit_id
    tagged.metadata = metadata
    return tagged, submit_id


def submit_id_of(machine: Machine) -> str | None:
    """The submit id a machine was created with, if it carries one."""
    return machine.metadata_value(SUBMIT_ID_KEY)


def is_ambiguous(exc: MachinesError) -> bool:
    """True when the create may have taken effect even though it failed."""
    if isinstance(exc, MachinesConnectionError):
        return exc.request_sent
    if isinstance(exc, InsufficientCapacity):
        return False
    return isinstance(exc, MachinesAPIError) and (exc.status_code == 408 or exc.status_code >= 500)


async def create_without_duplicates(
    *,
    post: Callable[[], Awaitable[Machine]],
    find: Callable[[], Awaitable[Machine | None]],
    submit_id: str,
    policy: RequestRetryPolicy,
    clock: Clock,
) -> Machine:
    """Send the create via ``post`` until it succeeds, following the module docstring's rules.

    ``find()`` returns the machine carrying our submit id, or None.
    """
    started = clock.monotonic()
    attempt = 0
    was_ambiguous = False
    while True:
        attempt += 1
        try:
            return await post()
        except MachinesError as exc:
            if (
                was_ambiguous
                and isinstance(exc, ValidationFailed)
                and exc.api_status == "name_taken"
            ):
                found = await _look(find, submit_id, exc)
                if found is not None:
                    return _report_found(found, submit_id)
                raise
            ambiguous = is_ambiguous(exc)
            if not ambiguous and not nothing_happened(exc):
                raise
            was_ambiguous = was_ambiguous or ambiguous
            delay = policy.next_delay(attempt, exc, clock.monotonic() - started)
            if delay is not None:
                log.warning(
                    "create (submit id %s) failed, %s; trying again in %.2f s: %s",
                    submit_id,
                    "checking for the machine first" if ambiguous else "nothing was created",
                    delay,
                    exc,
                    extra={"action": "machines.create.retry"},
                )
                # Sleeping before the look-up also gives the eventually consistent list time to
                # show a machine the lost request did create.
                await clock.sleep(delay)
            if ambiguous:
                found = await _look(find, submit_id, exc)
                if found is not None:
                    return _report_found(found, submit_id)
            if delay is None:
                exc.add_note(
                    f"{SUBMIT_ID_KEY}={submit_id}: list machines with this metadata to see "
                    "whether the create took effect"
                )
                raise


async def _look(
    find: Callable[[], Awaitable[Machine | None]], submit_id: str, cause: MachinesError
) -> Machine | None:
    """``find()``; if the look-up itself fails, its error says the create may have happened."""
    try:
        return await find()
    except MachinesError as lookup_error:
        # Without this the caller would see only a failed list, not that a machine may exist.
        lookup_error.add_note(
            f"this failed while checking whether a create that failed ambiguously ({cause}) "
            f"took effect; list machines with metadata {SUBMIT_ID_KEY}={submit_id} before "
            "creating again"
        )
        raise


def _report_found(machine: Machine, submit_id: str) -> Machine:
    log.info(
        "create (submit id %s) had taken effect: machine %s",
        submit_id,
        machine.id,
        extra={"action": "machines.create.found"},
    )
    return machine
