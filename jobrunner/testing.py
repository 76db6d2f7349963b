"""Helpers for testing code that uses jobrunner: an in-memory run ledger.

:class:`MemoryLedger` implements :class:`jobrunner.store.Ledger` without a database. It means
exactly what the SQL ledger means: the same errors (``RunNotFound``, ``AmbiguousRunId``,
``InvalidRunId``, ``AttemptNotFound``, ``StoreIntegrityError``, ``ValueError``), the same run-id
prefix rules, the same recorded transitions, a run finished exactly once, the same claim, queue
and idempotency rules, the same ordering. The shared contract suite
(``tests/store/test_ledger_contract.py``) runs against it and against SQLite and PostgreSQL.

Every timestamp, claim expiries included, comes from the ``clock`` it is given, so a test can
move time forward instead of sleeping::

    from datetime import timedelta

    from jobrunner.clock import Clock
    from jobrunner.store import RunRequest
    from jobrunner.testing import MemoryLedger


    class FakeClock(Clock):
        def __init__(self) -> None:
            self.t = 1_700_000_000.0

        def time(self) -> float:
            return self.t


    async def test_a_due_run_is_claimed_once() -> None:
        clock = FakeClock()
        ledger = MemoryLedger(clock)
        request = RunRequest(
            job_name="report", job_snapshot={"name": "report"}, backend="local", app=None,
            region=None, max_attempts=3, timeout_s=None, queue="default",
            run_at=clock.now() + timedelta(minutes=5),
        )
        [(run, created)] = await ledger.enqueue_runs([request])
        assert created and run.state == "pending"

        assert await ledger.claim_due("w1", backend="local", queues=["default"], limit=5,
                                      ttl_s=30) == []  # not due yet
        clock.t += 300
        [claimed] = await ledger.claim_due("w1", backend="local", queues=["default"], limit=5,
                                           ttl_s=30)
        assert claimed.id == run.id and claimed.owner == "w1"

It is meant for one event loop: no threads, and no method awaits in the middle of a change, so
every call is atomic like one SQL transaction (each still yields to the loop once, before it
starts, as a database call would).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio.lowlevel

from jobrunner.clock import SYSTEM_CLOCK, Clock
from jobrunner.states import ACTIVE_STATES, ATTEMPT_OUTCOMES, RUN_STATES, TERMINAL_STATES
from jobrunner.store.errors import (
    AmbiguousRunId,
    AttemptNotFound,
    BlobNotFound,
    InvalidRunId,
    RunNotFound,
    StoreError,
    StoreIntegrityError,
)
from jobrunner.store.ids import ID_LENGTH, new_run_id, normalise_prefix
from jobrunner.store.ledger import Ledger
from jobrunner.store.records import Attempt, LogLine, LogLineIn, Run, Transition
from jobrunner.store.store import (
    ATTEMPT_FIELDS,
    BACKENDS,
    DEFAULT_IDEMPOTENCY_WINDOW,
    MIN_PREFIX_LENGTH,
    RUN_FIELDS,
    RunRequest,
    snapshot_blob_refs,
)

__all__ = ["MemoryLedger"]


def _check_aware(fields: Mapping[str, Any]) -> None:
    for name, value in fields.items():
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError(f"{name} must be a timezone-aware datetime (UTC), got {value!r}")


def _check_fields(given: Iterable[str], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"cannot set {', '.join(unknown)} on {what}; settable: {sorted(allowed)}")


def _utc(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` with datetimes in UTC, as the SQL store gives them back."""
    return {k: v.astimezone(UTC) if isinstance(v, datetime) else v for k, v in fields.items()}


def _as_json(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The snapshot as a JSON column stores it (a deep copy, tuples turned into lists, ...)."""
    try:
        stored = json.loads(json.dumps(snapshot))
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"database error on memory: cannot store job_snapshot as JSON: {exc}"
        ) from exc
    assert isinstance(stored, dict)
    return stored


def _due(run: Run) -> datetime:
    return run.next_attempt_at or run.created_at


def _claim_order(run: Run) -> tuple[int, datetime, str]:
    return (-run.priority, _due(run), run.id)


class MemoryLedger:
    """A :class:`~jobrunner.store.Ledger` in memory, with the SQL ledger's semantics.

    ``clock`` stamps every time the ledger writes and decides when claims expire and runs are
    due (where the SQL ledger on PostgreSQL would use the database server's time).
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, datetime]] = {}
        self._runs: dict[str, Run] = {}
        self._attempts: dict[str, dict[int, Attempt]] = {}
        self._submit_ids: set[str] = set()
        self._transitions: dict[str, list[Transition]] = {}
        self._logs: dict[str, list[LogLine]] = {}
        self._log_keys: set[tuple[str, int, str]] = set()
        self._attempt_ids = itertools.count(1)
        self._transition_ids = itertools.count(1)
        self._log_ids = itertools.count(1)
        self._blobs: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"MemoryLedger({len(self._runs)} runs)"

    # ----- helpers -----

    @staticmethod
    def _out(run: Run) -> Run:
        # A copy of the snapshot, so a caller changing the returned dict cannot change the ledger.
        return replace(run, job_snapshot=copy.deepcopy(run.job_snapshot))

    def _require(self, run_id: str) -> Run:
        run = self._runs.get(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    def _record(
        self,
        run_id: str,
        from_state: str | None,
        to_state: str,
        reason: str | None,
        attempt_number: int | None,
        at: datetime,
    ) -> Transition:
        return Transition(
            id=next(self._transition_ids),
            run_id=run_id,
            attempt_number=attempt_number,
            from_state=from_state,
            to_state=to_state,
            reason=reason,
            at=at,
        )

    def _new_run(
        self, request: RunRequest, *, owner: str | None = None, owner_ttl_s: float = 30.0
    ) -> tuple[Run, Transition]:
        """A new pending run and its first transition, not stored yet."""
        if request.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, not {request.backend!r}")
        if request.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {request.max_attempts}")
        if request.run_at is not None:
            _check_aware({"run_at": request.run_at})
        now = self._clock.now()
        run = Run(
            id=new_run_id(),
            job_name=request.job_name,
            job_snapshot=_as_json(request.job_snapshot),
            backend=request.backend,
            app=request.app,
            region=request.region,
            state="pending",
            exit_code=None,
            reason=None,
            attempts=0,
            max_attempts=request.max_attempts,
            timeout_s=request.timeout_s,
            trigger=request.trigger,
            queue=request.queue,
            priority=request.priority,
            idempotency_key=request.idempotency_key,
            cancel_requested=False,
            owner=owner,
            owner_expires_at=now + timedelta(seconds=owner_ttl_s) if owner is not None else None,
            next_attempt_at=request.run_at.astimezone(UTC) if request.run_at else None,
            created_at=now,
            started_at=None,
            finished_at=None,
            updated_at=now,
        )
        reason = "submitted" if request.queue is None else f"enqueued on {request.queue}"
        return run, self._record(run.id, None, "pending", reason, None, now)

    def _put_snapshot_blobs(self, snapshots: Iterable[Mapping[str, Any]]) -> None:
        """As the SQL store: the blobs a snapshot refers to are stored (from the bytes a
        ``JobSnapshot`` carries) before its run, each once; all checked before any is kept."""
        new: dict[str, bytes] = {}
        for snapshot in snapshots:
            attached = getattr(snapshot, "blobs", None) or {}
            for digest in snapshot_blob_refs(snapshot):
                if digest in self._blobs or digest in new:
                    continue
                load = attached.get(digest)
                if load is None:
                    raise ValueError(
                        f"the job snapshot refers to file contents (sha256 {digest}) that the "
                        "ledger does not hold: pass the snapshot Job.snapshot() returned (it "
                        "carries the bytes), not a copy of it"
                    )
                data = bytes(load())
                if hashlib.sha256(data).hexdigest() != digest:
                    raise ValueError(f"the bytes given for blob {digest} do not have that sha256")
                new[digest] = data
        self._blobs.update(new)

    async def put_blob(self, data: bytes) -> str:
        await anyio.lowlevel.checkpoint()
        digest = hashlib.sha256(data).hexdigest()
        self._blobs.setdefault(digest, bytes(data))
        return digest

    async def get_blob(self, sha256: str) -> bytes:
        await anyio.lowlevel.checkpoint()
        try:
            return self._blobs[sha256]
        except KeyError:
            raise BlobNotFound(sha256) from None

    def _store_new(self, run: Run, first: Transition) -> None:
        self._runs[run.id] = run
        self._attempts[run.id] = {}
        self._transitions[run.id] = [first]
        self._logs[run.id] = []

    # ----- runs -----

    async def create_run(
        self,
        *,
        job_name: str,
        job_snapshot: dict[str, Any],
        backend: str,
        app: str | None,
        region: str | None,
        max_attempts: int,
        timeout_s: float | None,
        trigger: str = "cli",
        owner: str | None = None,
        owner_ttl_s: float = 30.0,
    ) -> Run:
        await anyio.lowlevel.checkpoint()
        request = RunRequest(
            job_name=job_name,
            job_snapshot=job_snapshot,
            backend=backend,
            app=app,
            region=region,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            trigger=trigger,
        )
        run, first = self._new_run(request, owner=owner, owner_ttl_s=owner_ttl_s)
        self._put_snapshot_blobs([job_snapshot])
        self._store_new(run, first)
        return self._out(run)

    async def enqueue_runs(
        self,
        requests: Sequence[RunRequest],
        *,
        idempotency_window: timedelta = DEFAULT_IDEMPOTENCY_WINDOW,
    ) -> list[tuple[Run, bool]]:
        await anyio.lowlevel.checkpoint()
        # Built aside and stored at the end: a bad request leaves nothing behind (one transaction).
        staged: list[tuple[Run, Transition]] = []
        out: list[tuple[Run, bool]] = []
        for request in requests:
            existing = None
            if request.idempotency_key is not None:
                existing = self._idempotent_match(
                    [*self._runs.values(), *(run for run, _ in staged)],
                    request.idempotency_key,
                    idempotency_window,
                )
            if existing is not None:
                out.append((existing, False))
            else:
                run, first = self._new_run(request)
                staged.append((run, first))
                out.append((run, True))
        self._put_snapshot_blobs([r.job_snapshot for r in requests])
        for run, first in staged:
            self._store_new(run, first)
        return [(self._out(run), created) for run, created in out]

    def _idempotent_match(
        self, candidates: Iterable[Run], key: str, window: timedelta
    ) -> Run | None:
        since = self._clock.now() - window
        matches = [
            run
            for run in candidates
            if run.idempotency_key == key
            and (
                run.state in ACTIVE_STATES
                or (run.finished_at is not None and run.finished_at >= since)
            )
        ]
        return max(matches, key=lambda r: r.created_at) if matches else None

    async def get_run(self, run_id_or_prefix: str) -> Run:
        await anyio.lowlevel.checkpoint()
        prefix = normalise_prefix(run_id_or_prefix)
        if prefix is None:
            raise RunNotFound(run_id_or_prefix)
        if len(prefix) < MIN_PREFIX_LENGTH:
            raise InvalidRunId(
                f"run id prefix {run_id_or_prefix!r} is too short: give at least "
                f"{MIN_PREFIX_LENGTH} characters (see `jobrunner runs list`)"
            )
        if len(prefix) >= ID_LENGTH:
            found = [self._runs[prefix]] if prefix in self._runs else []
        else:
            ids = sorted(run_id for run_id in self._runs if run_id.startswith(prefix))[:6]
            found = [self._runs[run_id] for run_id in ids]
        if not found:
            raise RunNotFound(run_id_or_prefix)
        if len(found) > 1:
            raise AmbiguousRunId(run_id_or_prefix, [run.id for run in found])
        return self._out(found[0])

    async def list_runs(
        self,
        *,
        job: str | None = None,
        state: str | Sequence[str] | None = None,
        limit: int | None = 50,
    ) -> list[Run]:
        await anyio.lowlevel.checkpoint()
        selected: Iterable[Run] = self._runs.values()
        if job is not None:
            selected = [run for run in selected if run.job_name == job]
        if state:
            wanted = [state] if isinstance(state, str) else list(state)
            unknown = sorted(set(wanted) - RUN_STATES)
            if unknown:
                raise ValueError(f"unknown run state(s) {unknown}; use {sorted(RUN_STATES)}")
            selected = [run for run in selected if run.state in wanted]
        ordered = sorted(selected, key=lambda r: (r.created_at, r.id), reverse=True)
        if limit is not None:
            ordered = ordered[: max(0, limit)]
        return [self._out(run) for run in ordered]

    async def list_unfinished_runs(self, *, limit: int | None = None) -> list[Run]:
        await anyio.lowlevel.checkpoint()
        ordered = sorted(
            (run for run in self._runs.values() if run.state in ACTIVE_STATES),
            key=lambda r: (r.created_at, r.id),
        )
        if limit is not None:
            ordered = ordered[: max(0, limit)]
        return [self._out(run) for run in ordered]

    async def transition_run(
        self,
        run_id: str,
        to_state: str,
        *,
        reason: str | None = None,
        from_states: Collection[str] | None = None,
        attempt_number: int | None = None,
        **fields: Any,
    ) -> bool:
        await anyio.lowlevel.checkpoint()
        if to_state not in RUN_STATES:
            raise ValueError(f"unknown run state {to_state!r}; use one of {sorted(RUN_STATES)}")
        _check_fields(fields, RUN_FIELDS, "a run")
        _check_aware(fields)
        allowed = ACTIVE_STATES if from_states is None else frozenset(from_states)
        run = self._require(run_id)
        if run.state not in allowed:
            return False
        now = self._clock.now()
        values: dict[str, Any] = {"state": to_state, "updated_at": now}
        if to_state == "running" and run.started_at is None:
            values["started_at"] = now
        if to_state in TERMINAL_STATES:
            values.update(finished_at=now, next_attempt_at=None, reason=reason)
        values.update(_utc(fields))
        self._runs[run_id] = replace(run, **values)
        self._transitions[run_id].append(
            self._record(run_id, run.state, to_state, reason, attempt_number, now)
        )
        return True

    async def finish_run(
        self, run_id: str, outcome: str, *, exit_code: int | None = None, reason: str | None = None
    ) -> bool:
        if outcome not in TERMINAL_STATES:
            await anyio.lowlevel.checkpoint()
            raise ValueError(f"outcome must be one of {sorted(TERMINAL_STATES)}, not {outcome!r}")
        return await self.transition_run(
            run_id, outcome, reason=reason, from_states=ACTIVE_STATES, exit_code=exit_code
        )

    async def transitions(self, run_id: str) -> list[Transition]:
        await anyio.lowlevel.checkpoint()
        return list(self._transitions.get(run_id, []))

    async def request_cancel(self, run_id: str) -> bool:
        await anyio.lowlevel.checkpoint()
        run = self._require(run_id)
        if run.state not in ACTIVE_STATES:
            return False
        self._runs[run_id] = replace(run, cancel_requested=True, updated_at=self._clock.now())
        return True

    # ----- attempts -----

    async def create_attempt(
        self, run_id: str, number: int, *, submit_id: str, region: str | None
    ) -> Attempt:
        await anyio.lowlevel.checkpoint()
        now = self._clock.now()
        run = self._require(run_id)
        if number in self._attempts[run_id] or submit_id in self._submit_ids:
            raise StoreIntegrityError(
                f"run {run_id} already has attempt {number}, or submit id {submit_id!r} is "
                "taken (the ledger refused a write: duplicate attempt)"
            )
        attempt = Attempt(
            id=next(self._attempt_ids),
            run_id=run_id,
            number=number,
            submit_id=submit_id,
            machine_id=None,
            instance_id=None,
            region=region,
            state="creating",
            outcome=None,
            exit_code=None,
            oom_killed=None,
            signal=None,
            requested_stop=None,
            reason=None,
            created_at=now,
            started_at=None,
            finished_at=None,
            logs_copied_at=None,
        )
        self._attempts[run_id][number] = attempt
        self._submit_ids.add(submit_id)
        self._runs[run_id] = replace(
            run, attempts=max(run.attempts, number), next_attempt_at=None, updated_at=now
        )
        return attempt

    async def update_attempt(self, run_id: str, number: int, **fields: Any) -> Attempt:
        await anyio.lowlevel.checkpoint()
        _check_fields(fields, ATTEMPT_FIELDS, "an attempt")
        _check_aware(fields)
        outcome = fields.get("outcome")
        if outcome is not None and outcome not in ATTEMPT_OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(ATTEMPT_OUTCOMES)}, not {outcome!r}")
        attempt = self._attempts.get(run_id, {}).get(number)
        if attempt is None:
            raise AttemptNotFound(run_id, number)
        if fields:
            attempt = replace(attempt, **_utc(fields))
            self._attempts[run_id][number] = attempt
        return attempt

    async def get_attempts(self, run_id: str) -> list[Attempt]:
        await anyio.lowlevel.checkpoint()
        by_number = self._attempts.get(run_id, {})
        return [by_number[n] for n in sorted(by_number)]

    async def latest_attempt(self, run_id: str) -> Attempt | None:
        await anyio.lowlevel.checkpoint()
        by_number = self._attempts.get(run_id, {})
        return by_number[max(by_number)] if by_number else None

    async def machine_ids_of_live_runs(self) -> set[str]:
        await anyio.lowlevel.checkpoint()
        return {
            attempt.machine_id
            for run_id, run in self._runs.items()
            if run.state in ACTIVE_STATES
            for attempt in self._attempts[run_id].values()
            if attempt.machine_id is not None
        }

    async def attempts_missing_logs(
        self, *, backend: str, finished_before: datetime, since: datetime, limit: int
    ) -> list[Attempt]:
        await anyio.lowlevel.checkpoint()
        found = [
            attempt
            for run_id, run in self._runs.items()
            if run.backend == backend
            for attempt in self._attempts[run_id].values()
            if attempt.machine_id is not None
            and attempt.logs_copied_at is None
            and attempt.finished_at is not None
            and since <= attempt.finished_at < finished_before
        ]
        return sorted(found, key=lambda a: a.finished_at or since)[:limit]

    # ----- claims -----

    @staticmethod
    def _expired(run: Run, now: datetime) -> bool:
        return run.owner_expires_at is not None and run.owner_expires_at < now

    async def claim_run(self, run_id: str, owner: str, ttl_s: float) -> bool:
        await anyio.lowlevel.checkpoint()
        run = self._runs.get(run_id)
        now = self._clock.now()
        if run is None or run.state not in ACTIVE_STATES:
            return False
        if not (
            run.owner is None
            or run.owner_expires_at is None
            or self._expired(run, now)
            or run.owner == owner
        ):
            return False
        self._set_owner(run, owner, now + timedelta(seconds=ttl_s))
        return True

    async def takeover_claim(
        self, run_id: str, expected_owner: str | None, owner: str, ttl_s: float
    ) -> bool:
        await anyio.lowlevel.checkpoint()
        run = self._runs.get(run_id)
        if run is None or run.state not in ACTIVE_STATES or run.owner != expected_owner:
            return False
        self._set_owner(run, owner, self._clock.now() + timedelta(seconds=ttl_s))
        return True

    def _set_owner(self, run: Run, owner: str | None, expires: datetime | None) -> Run:
        updated = replace(run, owner=owner, owner_expires_at=expires)
        self._runs[run.id] = updated
        return updated

    async def renew_claims(self, owner: str, ttl_s: float) -> set[str]:
        await anyio.lowlevel.checkpoint()
        expires = self._clock.now() + timedelta(seconds=ttl_s)
        held = [r for r in self._runs.values() if r.owner == owner]
        for run in held:
            self._set_owner(run, owner, expires)
        return {run.id for run in held}

    async def cancel_requests(self, owner: str) -> set[str]:
        await anyio.lowlevel.checkpoint()
        return {
            run.id
            for run in self._runs.values()
            if run.owner == owner and run.cancel_requested and run.state in ACTIVE_STATES
        }

    # The composite steps below call the single ones in order. Between them another task on the
    # loop could act (the SQL store runs each in one transaction); a test that needs them atomic
    # against concurrent tasks should use SQLite.

    async def begin_attempt(
        self,
        run_id: str,
        number: int,
        *,
        submit_id: str,
        region: str | None,
        reason: str = "creating machine",
    ) -> Attempt:
        attempt = await self.create_attempt(run_id, number, submit_id=submit_id, region=region)
        await self.transition_run(run_id, "creating", reason=reason, attempt_number=number)
        return attempt

    async def advance_attempt(
        self,
        run_id: str,
        number: int,
        *,
        to_state: str,
        reason: str,
        from_states: Collection[str] | None = None,
        run_fields: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Attempt:
        _check_fields(dict(run_fields or {}), RUN_FIELDS, "a run")
        attempt = await self.update_attempt(run_id, number, **fields)
        await self.transition_run(
            run_id,
            to_state,
            reason=reason,
            from_states=from_states,
            attempt_number=number,
            **(run_fields or {}),
        )
        return attempt

    async def end_attempt(
        self,
        run_id: str,
        number: int,
        *,
        owner: str,
        outcome: str | None = None,
        exit_code: int | None = None,
        reason: str | None = None,
        requeue_at: datetime | None = None,
        requeue_reason: str | None = None,
        attempt_fields: Mapping[str, Any],
    ) -> Run:
        if (outcome is None) == (requeue_at is None):
            raise ValueError("end_attempt needs exactly one of outcome or requeue_at")
        if outcome is not None and outcome not in TERMINAL_STATES:
            raise ValueError(f"outcome must be one of {sorted(TERMINAL_STATES)}, not {outcome!r}")
        await self.update_attempt(run_id, number, **attempt_fields)
        if outcome is not None:
            await self.finish_run(run_id, outcome, exit_code=exit_code, reason=reason)
        else:
            await self.transition_run(
                run_id,
                "pending",
                reason=requeue_reason,
                attempt_number=number,
                next_attempt_at=requeue_at,
            )
        await self.release_claim(run_id, owner)
        return self._out(self._require(run_id))

    async def release_claim(self, run_id: str, owner: str) -> None:
        await anyio.lowlevel.checkpoint()
        run = self._runs.get(run_id)
        if run is not None and run.owner == owner:
            self._set_owner(run, None, None)

    async def claim_due(
        self,
        owner: str,
        *,
        backend: str,
        queues: Sequence[str],
        limit: int,
        ttl_s: float,
        queue_limits: Mapping[str, int] | None = None,
    ) -> list[Run]:
        await anyio.lowlevel.checkpoint()
        if limit <= 0 or not queues:
            return []
        limits = dict(queue_limits or {})
        now = self._clock.now()
        room: dict[str, int | None] = {
            q: self._queue_room(q, limits[q], now) if q in limits else None for q in set(queues)
        }
        candidates = sorted(
            (
                run
                for run in self._runs.values()
                if run.state == "pending"
                and run.queue in room
                and run.backend == backend
                and (run.owner is None or self._expired(run, now))
                and (run.next_attempt_at is None or run.next_attempt_at <= now)
            ),
            key=_claim_order,
        )
        expires = now + timedelta(seconds=ttl_s)
        claimed: list[Run] = []
        for run in candidates:
            if len(claimed) >= limit:
                break
            assert run.queue is not None
            left = room[run.queue]
            if left is not None:
                if left <= 0:
                    continue
                room[run.queue] = left - 1
            updated = replace(run, owner=owner, owner_expires_at=expires, updated_at=now)
            self._runs[run.id] = updated
            claimed.append(updated)
        return [self._out(run) for run in claimed]

    def _queue_room(self, queue: str, cap: int, now: datetime) -> int:
        in_flight = sum(
            1
            for run in self._runs.values()
            if run.queue == queue
            and run.state in ACTIVE_STATES
            and run.owner is not None
            and run.owner_expires_at is not None
            and run.owner_expires_at >= now
        )
        return max(0, cap - in_flight)

    async def claim_orphans(
        self, owner: str, *, backend: str, limit: int, ttl_s: float, dead_owners: Collection[str]
    ) -> list[Run]:
        await anyio.lowlevel.checkpoint()
        if limit <= 0:
            return []
        now = self._clock.now()
        dead = set(dead_owners)

        def orphaned(run: Run) -> bool:
            return (
                self._expired(run, now)
                or (run.owner is not None and run.owner in dead)
                or (run.owner is None and (run.queue is None or run.state != "pending"))
            )

        picked = sorted(
            (
                run
                for run in self._runs.values()
                if run.state in ACTIVE_STATES
                and run.backend == backend
                and orphaned(run)
                and (run.next_attempt_at is None or run.next_attempt_at <= now)
            ),
            key=lambda r: (r.created_at, r.id),
        )[:limit]
        expires = now + timedelta(seconds=ttl_s)
        return [self._out(self._set_owner(run, owner, expires)) for run in picked]

    async def claim_owners(self, backend: str) -> set[str]:
        await anyio.lowlevel.checkpoint()
        return {
            run.owner
            for run in self._runs.values()
            if run.state in ACTIVE_STATES and run.backend == backend and run.owner is not None
        }

    async def requeue_run(
        self,
        run_id: str,
        owner: str,
        *,
        next_attempt_at: datetime,
        reason: str,
        attempt_number: int,
    ) -> bool:
        await anyio.lowlevel.checkpoint()
        _check_aware({"next_attempt_at": next_attempt_at})
        run = self._runs.get(run_id)
        if run is None or run.owner != owner or run.state not in ACTIVE_STATES:
            return False
        now = self._clock.now()
        self._runs[run_id] = replace(
            run,
            state="pending",
            next_attempt_at=next_attempt_at.astimezone(UTC),
            owner=None,
            owner_expires_at=None,
            updated_at=now,
        )
        self._transitions[run_id].append(
            self._record(run_id, run.state, "pending", reason, attempt_number, now)
        )
        return True

    async def retry_run(self, run_id: str, *, extra_attempts: int) -> Run:
        await anyio.lowlevel.checkpoint()
        if extra_attempts < 1:
            raise ValueError(f"extra_attempts must be at least 1, not {extra_attempts}")
        run = self._require(run_id)
        if run.state not in TERMINAL_STATES:
            raise ValueError(
                f"run {run_id} is still {run.state}; only a finished run can be retried"
            )
        now = self._clock.now()
        fresh = replace(
            run,
            state="pending",
            max_attempts=run.attempts + extra_attempts,
            cancel_requested=False,
            exit_code=None,
            reason=None,
            next_attempt_at=None,
            finished_at=None,
            owner=None,
            owner_expires_at=None,
            queue=run.queue or "default",
            updated_at=now,
        )
        self._runs[run_id] = fresh
        self._transitions[run_id].append(
            self._record(run_id, run.state, "pending", "retried by the user", None, now)
        )
        return self._out(fresh)

    async def queue_stats(self) -> list[dict[str, Any]]:
        await anyio.lowlevel.checkpoint()
        stats: dict[str, dict[str, Any]] = {}
        for run in self._runs.values():
            if run.queue is None:
                continue
            entry = stats.setdefault(
                run.queue, {"queue": run.queue, "pending": 0, "in_flight": 0, "dead": 0}
            )
            if run.state == "pending" and run.owner is None:
                entry["pending"] += 1
            elif run.state in ACTIVE_STATES:
                entry["in_flight"] += 1
            elif run.state == "dead":
                entry["dead"] += 1
        return sorted(stats.values(), key=lambda e: str(e["queue"]))

    # ----- rate limits -----

    async def take_rate_token(self, key: str, rate: float, burst: int) -> float:
        await anyio.lowlevel.checkpoint()
        if rate <= 0 or burst < 1:
            raise ValueError(f"a bucket needs rate > 0 and burst >= 1, got {rate} and {burst}")
        now = self._clock.now()
        tokens, updated = self._buckets.get(key, (float(burst), now))
        elapsed = max(0.0, (now - updated).total_seconds())
        tokens = min(float(burst), tokens + elapsed * rate) - 1.0
        self._buckets[key] = (tokens, max(now, updated))
        return max(0.0, -tokens / rate)

    # ----- logs -----

    async def add_logs(self, run_id: str, attempt_number: int, lines: Iterable[LogLineIn]) -> int:
        await anyio.lowlevel.checkpoint()
        new: dict[str, LogLineIn] = {}
        for line in lines:
            if line.ts.tzinfo is None:
                raise ValueError(f"log line timestamp must be timezone-aware, got {line.ts!r}")
            new.setdefault(line.key(), line)
        if not new:
            return 0
        if run_id not in self._runs:
            raise StoreIntegrityError(f"the ledger refused a write: no run {run_id} for log lines")
        added = 0
        for key, line in new.items():
            if (run_id, attempt_number, key) in self._log_keys:
                continue
            self._log_keys.add((run_id, attempt_number, key))
            self._logs[run_id].append(
                LogLine(
                    id=next(self._log_ids),
                    run_id=run_id,
                    attempt_number=attempt_number,
                    entry_id=key,
                    ts=line.ts.astimezone(UTC),
                    stream=line.stream[:16],
                    message=line.message,
                )
            )
            added += 1
        return added

    async def get_logs(
        self, run_id: str, *, after_id: int = 0, limit: int | None = None
    ) -> list[LogLine]:
        await anyio.lowlevel.checkpoint()
        lines = [line for line in self._logs.get(run_id, []) if line.id > after_id]
        return lines if limit is None else lines[: max(0, limit)]


def _conforms() -> Ledger:
    # mypy checks here that MemoryLedger keeps the Ledger protocol.
    return MemoryLedger()
