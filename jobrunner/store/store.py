"""The run ledger's operations: every SQL statement jobrunner runs lives here.

Each public method is one transaction. Every change of a run's state is a conditional UPDATE and
writes its ``run_transitions`` row in the same transaction, so the history can never disagree
with the current state, and two processes racing to finish a run cannot both succeed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY

from jobrunner.clock import SYSTEM_CLOCK, Clock
from jobrunner.states import ACTIVE_STATES, ATTEMPT_OUTCOMES, RUN_STATES, TERMINAL_STATES
from jobrunner.store.bulk import BulkInsert
from jobrunner.store.engine import (
    READ_OPTION,
    create_store_engine,
    is_in_memory_url,
    mask_url,
    resolve_url,
    translate_errors,
)
from jobrunner.store.errors import (
    AmbiguousRunId,
    AttemptNotFound,
    BlobNotFound,
    InvalidRunId,
    RunNotFound,
    StoreIntegrityError,
)
from jobrunner.store.ids import ALPHABET, ID_LENGTH, new_run_id, normalise_prefix
from jobrunner.store.migrate import upgrade
from jobrunner.store.records import (
    Attempt,
    Fire,
    LogLine,
    LogLineIn,
    Run,
    ScheduleState,
    Transition,
)
from jobrunner.store.tables import (
    METADATA,
    AttemptRow,
    BlobRow,
    LogLineRow,
    RateBucketRow,
    RunBlobRow,
    RunRow,
    ScheduleFireRow,
    ScheduleRow,
    TransitionRow,
)

__all__ = [
    "DEFAULT_IDEMPOTENCY_WINDOW",
    "MIN_PREFIX_LENGTH",
    "FireDecision",
    "RunRequest",
    "Store",
    "snapshot_blob_refs",
]

logger = logging.getLogger(__name__)

MIN_PREFIX_LENGTH = 6
BACKENDS = frozenset({"local", "fly"})
# An idempotency key names the same run while it is unfinished and for this long after it ends.
DEFAULT_IDEMPOTENCY_WINDOW = timedelta(hours=24)
# PostgreSQL NOTIFY channel that enqueues signal on (jobrunner.wakeup listens to it).
WAKEUP_CHANNEL = "jobrunner_wakeup"

# The statements below use the Core tables of the SQLModel models (typed, and no ORM session).
runs = METADATA.tables[RunRow.__tablename__]
attempts = METADATA.tables[AttemptRow.__tablename__]
transitions_table = METADATA.tables[TransitionRow.__tablename__]
log_lines = METADATA.tables[LogLineRow.__tablename__]
rate_buckets = METADATA.tables[RateBucketRow.__tablename__]
schedules_table = METADATA.tables[ScheduleRow.__tablename__]
fires = METADATA.tables[ScheduleFireRow.__tablename__]
blobs_table = METADATA.tables[BlobRow.__tablename__]
run_blobs = METADATA.tables[RunBlobRow.__tablename__]
# PostgreSQL advisory lock between storing blobs (shared: any number at once) and collecting
# unused ones (exclusive), so a blob is never deleted while a new run that uses it commits.
BLOB_LOCK = 0x6A725F626C6F6273  # "jr_blobs"
# Rows per statement when many fires are decided at once (10,000 schedules due at one minute).
FIRE_BATCH = 500
# Fires recorded per transaction: each commits (and is visible to workers) on its own, so a
# burst of 10,000 is taken by workers as it is written; larger would save round trips but
# hold back the first runs.
FIRES_PER_TRANSACTION = 1000

# Columns callers may set through transition_run / update_attempt.
RUN_FIELDS = frozenset(
    {"exit_code", "reason", "region", "app", "next_attempt_at", "started_at", "finished_at"}
)
ATTEMPT_FIELDS = frozenset(
    {
        "machine_id",
        "instance_id",
        "region",
        "state",
        "outcome",
        "exit_code",
        "oom_killed",
        "signal",
        "requested_stop",
        "reason",
        "started_at",
        "finished_at",
        "logs_copied_at",
    }
)


def _prefix_upper_bound(prefix: str) -> str | None:
    """The smallest id-alphabet string above every id starting with ``prefix`` (None if none).

    Ids use only digits and capitals, which every collation orders as ASCII does, so the bound
    holds on SQLite and on PostgreSQL whatever the database's locale.
    """
    chars = list(prefix)
    while chars:
        position = ALPHABET.index(chars[-1])
        if position + 1 < len(ALPHABET):
            chars[-1] = ALPHABET[position + 1]
            return "".join(chars)
        chars.pop()  # ...Z: carry into the character before
    return None


def _lock_ids(namespace: str, names: Iterable[str]) -> list[int]:
    """PostgreSQL advisory lock ids (signed 64-bit) for ``names``, ascending: every transaction
    takes its locks in this one order, so two of them never wait for each other in a cycle."""
    return sorted(
        {
            int.from_bytes(
                hashlib.blake2b(f"{namespace}:{name}".encode(), digest_size=8).digest(),
                "big",
                signed=True,
            )
            for name in names
        }
    )


def _advisory_locks(db: sa.Connection, namespace: str, names: Iterable[str]) -> None:
    """Take transaction-scoped advisory locks on ``names`` (PostgreSQL only; SQLite's
    ``BEGIN IMMEDIATE`` already serialises writers)."""
    if db.dialect.name != "postgresql":
        return
    for lock_id in _lock_ids(namespace, names):
        db.execute(sa.select(sa.func.pg_advisory_xact_lock(lock_id)))


def snapshot_blob_refs(snapshot: Mapping[str, Any]) -> list[str]:
    """The sha256 digests of the blobs a job snapshot's files refer to (files too large to be
    kept inline: ``{"guest_path": ..., "sha256": ..., "size": ...}``), each once."""
    files = snapshot.get("files")
    if not files:
        return []
    found: list[str] = []
    for entry in files:
        if isinstance(entry, Mapping):
            digest = entry.get("sha256")
            if isinstance(digest, str) and digest not in found:
                found.append(digest)
    return found


def _attached_blobs(snapshot: Mapping[str, Any]) -> Mapping[str, Callable[[], bytes]]:
    """The bytes a ``jobrunner.spec.JobSnapshot`` carries beside its JSON (none for a dict)."""
    attached = getattr(snapshot, "blobs", None)
    return attached if isinstance(attached, Mapping) else {}


def _check_aware(fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError(f"{name} must be a timezone-aware datetime (UTC), got {value!r}")


def _check_fields(given: Iterable[str], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"cannot set {', '.join(unknown)} on {what}; settable: {sorted(allowed)}")


@dataclass(frozen=True)
class RunRequest:
    """What a new run needs: the job as it will run, where, and (for a queued run) how it queues."""

    job_name: str
    job_snapshot: dict[str, Any]
    backend: str
    app: str | None
    region: str | None
    max_attempts: int
    timeout_s: float | None
    trigger: str = "queue"
    queue: str | None = None
    priority: int = 0
    run_at: datetime | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class FireDecision:
    """What a scheduler decided about one tick: fire it (with the run to queue) or skip it."""

    schedule: str
    scheduled_for: datetime
    decision: str  # "fired" | "skipped"
    reason: str | None = None
    trigger: str = "cron"
    run: RunRequest | None = None
    # concurrency = "replace": cancel the schedule's unfinished runs as this one is queued.
    replace_running: bool = False


@dataclass(frozen=True)
class PreparedFires:
    """Fire decisions with their runs' rows already built (``Store.prepare_fires``)."""

    decisions: list[FireDecision]
    run_rows: dict[int, dict[str, Any]]  # decision index -> the run's row
    run_values: dict[int, list[Any]]  # the same, in the database's form

    def only(self, schedules: Collection[str]) -> PreparedFires:
        """The decisions (and rows) of these schedules only."""
        kept = [i for i, d in enumerate(self.decisions) if d.schedule in schedules]
        return PreparedFires(
            [self.decisions[i] for i in kept],
            {new: self.run_rows[old] for new, old in enumerate(kept) if old in self.run_rows},
            {new: self.run_values[old] for new, old in enumerate(kept) if old in self.run_values},
        )


def _new_run_row(request: RunRequest, now: datetime) -> dict[str, Any]:
    """The row of a new, unclaimed ``pending`` run for ``request`` (checked first)."""
    if request.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, not {request.backend!r}")
    if request.max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {request.max_attempts}")
    if request.run_at is not None:
        _check_aware({"run_at": request.run_at})
    return {
        "id": new_run_id(),
        "job_name": request.job_name,
        "job_snapshot": request.job_snapshot,
        "backend": request.backend,
        "app": request.app,
        "region": request.region,
        "state": "pending",
        "exit_code": None,
        "reason": None,
        "attempts": 0,
        "max_attempts": request.max_attempts,
        "timeout_s": request.timeout_s,
        "trigger": request.trigger,
        "queue": request.queue,
        "priority": request.priority,
        "idempotency_key": request.idempotency_key,
        "cancel_requested": False,
        "owner": None,
        "owner_expires_at": None,
        "next_attempt_at": request.run_at,
        "created_at": now,
        "started_at": None,
        "finished_at": None,
        "updated_at": now,
    }


class _FireWriters:
    """The bulk inserts a scheduler burst makes, built once per dialect."""

    def __init__(self, dialect: sa.engine.Dialect) -> None:
        run_columns = list(_new_run_row(_PROTOTYPE_REQUEST, datetime.now(UTC)))
        self.runs = BulkInsert(runs, run_columns, dialect)
        self.transitions = BulkInsert(
            transitions_table,
            ["run_id", "attempt_number", "from_state", "to_state", "reason", "at"],
            dialect,
        )
        self.fires = BulkInsert(
            fires,
            ["schedule", "scheduled_for", "decision", "reason", "trigger", "run_id", "decided_at"],
            dialect,
            on_conflict=["schedule", "scheduled_for"],
            returning=["id", "schedule", "scheduled_for"],
        )


_PROTOTYPE_REQUEST = RunRequest("prototype", {}, "local", None, None, 1, None)


class Store:
    """The run ledger: runs, their attempts, state transitions and log lines.

    ``url`` defaults to ``$JOBRUNNER_DATABASE_URL``, else ``sqlite:///$JOBRUNNER_HOME/jobrunner.db``
    (``JOBRUNNER_HOME`` defaults to ``~/.jobrunner``; its folder is created). Opening a database
    migrates it to this version's schema. Methods are synchronous and thread-safe; returned
    records are frozen dataclasses. Database errors are raised as ``StoreError`` subclasses.
    """

    TERMINAL_STATES: frozenset[str] = TERMINAL_STATES

    def __init__(self, url: str | None = None, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._url = resolve_url(url)
        self._fire_writer_cache: dict[str, _FireWriters] = {}
        with translate_errors(self._url):
            self._engine = create_store_engine(self._url)
            self._write_lock: AbstractContextManager[object] = (
                threading.RLock() if self._engine.dialect.name == "sqlite" else nullcontext()
            )
            # An in-memory database is one connection shared by every thread (StaticPool):
            # a read beginning while another thread's write is open would nest transactions.
            self._read_lock: AbstractContextManager[object] = (
                self._write_lock if is_in_memory_url(self._url) else nullcontext()
            )
            self._reader = self._engine.execution_options(**{READ_OPTION: True})
            try:
                upgrade(self._engine, where=f"the database {self.url}")
            except BaseException:
                self._engine.dispose()
                raise

    @classmethod
    def from_env(cls) -> Store:
        """A store for ``$JOBRUNNER_DATABASE_URL``, or the default SQLite file."""
        return cls(None)

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return mask_url(self._url)

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._engine.dialect.name

    def __repr__(self) -> str:
        return f"Store(url={self.url!r})"

    def close(self) -> None:
        """Close every pooled connection. The store must not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        # SQLite has one writer at a time. Threads of this process queue on a lock, woken the
        # moment it is free; left to SQLite's busy handler they would sleep in growing steps
        # (up to 100 ms) while the lock was free again after a millisecond.
        with self._write_lock, translate_errors(self._url), self._engine.begin() as connection:
            yield connection

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self._read_lock, translate_errors(self._url), self._reader.connect() as connection:
            yield connection

    # ----- runs -----

    def create_run(
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
        """Record a new run in state ``pending`` (with its first transition) and return it.

        With ``owner``, the run is born claimed by it, so no worker can take it between its
        creation and the first claim of the process that is about to drive it.
        """
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
        with self._write() as db:
            self._put_snapshot_blobs(db, [job_snapshot])
            return self._insert_run(db, request, owner=owner, owner_ttl_s=owner_ttl_s)

    def enqueue_runs(
        self,
        requests: Sequence[RunRequest],
        *,
        idempotency_window: timedelta = DEFAULT_IDEMPOTENCY_WINDOW,
    ) -> list[tuple[Run, bool]]:
        """Record queued runs in one transaction; each as ``(run, created)``.

        A request whose idempotency key names a run that is unfinished, or finished less than
        ``idempotency_window`` ago, returns that run (``created`` False) instead of a new one.
        On PostgreSQL the transaction also NOTIFYs idle workers (delivered on commit).
        """
        out: list[tuple[Run, bool]] = []
        with self._write() as db:
            # Two enqueuers of one key on different connections: the second waits for the first.
            # All of a batch's keys are locked up front, in one global order (no deadlock).
            keys = [r.idempotency_key for r in requests if r.idempotency_key is not None]
            _advisory_locks(db, "jr.key", keys)
            # Each distinct file once for the whole batch, before the runs that refer to it.
            self._put_snapshot_blobs(db, [r.job_snapshot for r in requests])
            for request in requests:
                existing = None
                if request.idempotency_key is not None:
                    existing = self._idempotent_match(
                        db, request.idempotency_key, idempotency_window
                    )
                if existing is not None:
                    out.append((existing, False))
                else:
                    out.append((self._insert_run(db, request), True))
            if db.dialect.name == "postgresql" and any(created for _, created in out):
                db.execute(sa.select(sa.func.pg_notify(WAKEUP_CHANNEL, "")))
        return out

    def _idempotent_match(self, db: sa.Connection, key: str, window: timedelta) -> Run | None:
        since = self._clock.now() - window
        row = db.execute(
            runs.select()
            .where(
                runs.c.idempotency_key == key,
                sa.or_(runs.c.state.in_(ACTIVE_STATES), runs.c.finished_at >= since),
            )
            .order_by(runs.c.created_at.desc())
            .limit(1)
        ).first()
        return Run.from_row(row) if row is not None else None

    def _insert_run(
        self,
        db: sa.Connection,
        request: RunRequest,
        *,
        owner: str | None = None,
        owner_ttl_s: float = 30.0,
    ) -> Run:
        now = self._clock.now()
        values = _new_run_row(request, now)
        if owner is not None:
            # A born claim is stamped like every other claim (the database's time on PostgreSQL).
            expires = self._claim_now(db) + timedelta(seconds=owner_ttl_s)
            values.update(owner=owner, owner_expires_at=expires)
        db.execute(runs.insert().values(values))
        refs = snapshot_blob_refs(request.job_snapshot)
        if refs:
            db.execute(run_blobs.insert(), [{"run_id": values["id"], "sha256": d} for d in refs])
        reason = "submitted" if request.queue is None else f"enqueued on {request.queue}"
        self._record(db, values["id"], None, "pending", reason, None, now)
        return Run(**values)

    # ----- blobs: job file contents, stored once -----

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` in the content-addressed blob store (once, however often it is put);
        returns its sha256, by which job snapshots refer to it."""
        digest = hashlib.sha256(data).hexdigest()
        with self._write() as db:
            self._insert_blobs(db, {digest: lambda: data})
        return digest

    def get_blob(self, sha256: str) -> bytes:
        """The bytes stored under ``sha256``; raises BlobNotFound."""
        with self._read() as db:
            row = db.execute(
                sa.select(blobs_table.c.data).where(blobs_table.c.sha256 == sha256)
            ).first()
        if row is None:
            raise BlobNotFound(sha256)
        data = row[0]
        return data if isinstance(data, bytes) else bytes(data)

    def blob_usage(self) -> tuple[int, int]:
        """How many blobs the ledger holds, and their bytes in all."""
        with self._read() as db:
            count, total = db.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(blobs_table.c.size), 0))
            ).one()
        return int(count), int(total)

    def _put_snapshot_blobs(
        self, db: sa.Connection, snapshots: Iterable[Mapping[str, Any]]
    ) -> None:
        """Make sure the blobs these snapshots refer to are stored, before their runs are:
        each distinct snapshot object is looked at once (a schedule's fires share one) and
        each missing blob written once, from the bytes the snapshot carries (``JobSnapshot``).
        A snapshot without them may only refer to blobs the ledger already holds."""
        wanted: dict[str, Callable[[], bytes] | None] = {}
        seen: set[int] = set()
        for snapshot in snapshots:
            if id(snapshot) in seen:
                continue
            seen.add(id(snapshot))
            refs = snapshot_blob_refs(snapshot)
            if refs:
                attached = _attached_blobs(snapshot)
                for digest in refs:
                    wanted[digest] = wanted.get(digest) or attached.get(digest)
        if wanted:
            self._insert_blobs(db, wanted)

    def _insert_blobs(
        self, db: sa.Connection, wanted: Mapping[str, Callable[[], bytes] | None]
    ) -> None:
        if db.dialect.name == "postgresql":
            db.execute(sa.select(sa.func.pg_advisory_xact_lock_shared(BLOB_LOCK)))
        present = {
            row.sha256
            for row in db.execute(
                sa.select(blobs_table.c.sha256).where(blobs_table.c.sha256.in_(list(wanted)))
            )
        }
        dialect_insert = postgresql.insert if db.dialect.name == "postgresql" else sqlite.insert
        for digest, load in wanted.items():
            if digest in present:
                continue
            if load is None:
                raise ValueError(
                    f"the job snapshot refers to file contents (sha256 {digest}) that the ledger "
                    "does not hold: pass the snapshot Job.snapshot() returned (it carries the "
                    "bytes), not a copy of it"
                )
            data = load()
            if hashlib.sha256(data).hexdigest() != digest:
                raise ValueError(f"the bytes given for blob {digest} do not have that sha256")
            db.execute(
                dialect_insert(blobs_table)
                .values(sha256=digest, size=len(data), data=data, created_at=self._clock.now())
                .on_conflict_do_nothing(index_elements=["sha256"])
            )
            del data

    def get_run(self, run_id_or_prefix: str) -> Run:
        """The run with this id, or the one run whose id starts with this prefix (>= 6 chars,
        any case). Raises RunNotFound, AmbiguousRunId or InvalidRunId."""
        prefix = normalise_prefix(run_id_or_prefix)
        if prefix is None:
            raise RunNotFound(run_id_or_prefix)
        if len(prefix) < MIN_PREFIX_LENGTH:
            raise InvalidRunId(
                f"run id prefix {run_id_or_prefix!r} is too short: give at least "
                f"{MIN_PREFIX_LENGTH} characters (see `jobrunner runs list`)"
            )
        with self._read() as db:
            if len(prefix) >= ID_LENGTH:
                rows = db.execute(runs.select().where(runs.c.id == prefix)).all()
            else:
                # A range on the primary key, so the lookup is an index search, not a scan (LIKE
                # cannot use the key's index on SQLite, nor on PostgreSQL outside the C locale).
                query = runs.select().where(
                    runs.c.id >= prefix, runs.c.id.startswith(prefix, autoescape=True)
                )
                upper = _prefix_upper_bound(prefix)
                if upper is not None:
                    query = query.where(runs.c.id < upper)
                rows = db.execute(query.order_by(runs.c.id).limit(6)).all()
        if not rows:
            raise RunNotFound(run_id_or_prefix)
        if len(rows) > 1:
            raise AmbiguousRunId(run_id_or_prefix, [r.id for r in rows])
        return Run.from_row(rows[0])

    def list_runs(
        self,
        *,
        job: str | None = None,
        state: str | Sequence[str] | None = None,
        limit: int | None = 50,
    ) -> list[Run]:
        """Runs, newest first, optionally of one job and/or in the given state(s)."""
        query = runs.select()
        if job is not None:
            query = query.where(runs.c.job_name == job)
        if state:
            wanted = [state] if isinstance(state, str) else list(state)
            unknown = sorted(set(wanted) - RUN_STATES)
            if unknown:
                raise ValueError(f"unknown run state(s) {unknown}; use {sorted(RUN_STATES)}")
            query = query.where(runs.c.state.in_(wanted))
        query = query.order_by(runs.c.created_at.desc(), runs.c.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self._read() as db:
            return [Run.from_row(row) for row in db.execute(query)]

    def list_unfinished_runs(self, *, limit: int | None = None) -> list[Run]:
        """Runs not yet in a terminal state, oldest first (at most ``limit``)."""
        query = (
            runs.select()
            .where(runs.c.state.in_(ACTIVE_STATES))
            .order_by(runs.c.created_at, runs.c.id)
            .limit(limit)
        )
        with self._read() as db:
            rows = db.execute(query)
            return [Run.from_row(row) for row in rows]

    def transition_run(
        self,
        run_id: str,
        to_state: str,
        *,
        reason: str | None = None,
        from_states: Collection[str] | None = None,
        attempt_number: int | None = None,
        **fields: Any,
    ) -> bool:
        """Move a run to ``to_state`` if it is in one of ``from_states`` (default: any
        non-terminal state, so a recorded outcome is never overwritten by accident).

        Returns False, writing nothing, when the run is in another state. Records the transition,
        sets ``updated_at``; ``started_at`` on first reaching ``running``; ``finished_at`` and
        ``reason`` (and clears ``next_attempt_at``) on reaching a terminal state. ``fields`` may set
        exit_code, reason, region, app, next_attempt_at, started_at, finished_at.
        Raises RunNotFound for an unknown id.
        """
        if to_state not in RUN_STATES:
            raise ValueError(f"unknown run state {to_state!r}; use one of {sorted(RUN_STATES)}")
        _check_fields(fields, RUN_FIELDS, "a run")
        _check_aware(fields)
        with self._write() as db:
            return self._transition(
                db, run_id, to_state, reason, from_states, attempt_number, fields
            )

    def _transition(
        self,
        db: sa.Connection,
        run_id: str,
        to_state: str,
        reason: str | None,
        from_states: Collection[str] | None,
        attempt_number: int | None,
        fields: dict[str, Any],
    ) -> bool:
        """``transition_run`` inside an open transaction."""
        allowed = ACTIVE_STATES if from_states is None else frozenset(from_states)
        current = db.execute(
            sa.select(runs.c.state, runs.c.started_at).where(runs.c.id == run_id).with_for_update()
        ).first()
        if current is None:
            raise RunNotFound(run_id)
        if current.state not in allowed:
            return False
        now = self._clock.now()
        values: dict[str, Any] = {"state": to_state, "updated_at": now}
        if to_state == "running" and current.started_at is None:
            values["started_at"] = now
        if to_state in TERMINAL_STATES:
            values.update(finished_at=now, next_attempt_at=None, reason=reason)
        values.update(fields)
        changed = db.execute(
            runs.update().where(runs.c.id == run_id, runs.c.state.in_(allowed)).values(values)
        ).rowcount
        if changed != 1:
            return False
        self._record(db, run_id, current.state, to_state, reason, attempt_number, now)
        return True

    def finish_run(
        self,
        run_id: str,
        outcome: str,
        *,
        exit_code: int | None = None,
        reason: str | None = None,
    ) -> bool:
        """Record a run's outcome. Exactly once: True only for the call that moved it from a
        non-terminal state; later (or concurrent losing) calls return False and change nothing."""
        if outcome not in TERMINAL_STATES:
            raise ValueError(f"outcome must be one of {sorted(TERMINAL_STATES)}, not {outcome!r}")
        return self.transition_run(
            run_id, outcome, reason=reason, from_states=ACTIVE_STATES, exit_code=exit_code
        )

    def transitions(self, run_id: str) -> list[Transition]:
        """The run's state changes, oldest first."""
        query = transitions_table.select().where(transitions_table.c.run_id == run_id)
        with self._read() as db:
            rows = db.execute(query.order_by(transitions_table.c.id))
            return [Transition.from_row(row) for row in rows]

    def request_cancel(self, run_id: str) -> bool:
        """Flag a run for cancellation (its driver stops it). False if it already finished."""
        with self._write() as db:
            changed = db.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.state.in_(ACTIVE_STATES))
                .values(cancel_requested=True, updated_at=self._clock.now())
            ).rowcount
            if changed == 0:
                self._require_run(db, run_id)
        return changed == 1

    @staticmethod
    def _require_run(db: sa.Connection, run_id: str) -> None:
        if db.execute(sa.select(runs.c.id).where(runs.c.id == run_id)).first() is None:
            raise RunNotFound(run_id)

    @staticmethod
    def _record(
        db: sa.Connection,
        run_id: str,
        from_state: str | None,
        to_state: str,
        reason: str | None,
        attempt_number: int | None,
        at: datetime,
    ) -> None:
        db.execute(
            transitions_table.insert().values(
                run_id=run_id,
                attempt_number=attempt_number,
                from_state=from_state,
                to_state=to_state,
                reason=reason,
                at=at,
            )
        )

    # ----- attempts -----

    def create_attempt(
        self, run_id: str, number: int, *, submit_id: str, region: str | None
    ) -> Attempt:
        """Record attempt ``number`` (state ``creating``) and count it in ``runs.attempts``.

        Raises RunNotFound, or StoreIntegrityError when the number or submit_id is taken.
        """
        try:
            with self._write() as db:
                return self._insert_attempt(db, run_id, number, submit_id, region)
        except StoreIntegrityError as exc:
            raise self._attempt_taken(run_id, number, submit_id, exc) from exc

    def begin_attempt(
        self,
        run_id: str,
        number: int,
        *,
        submit_id: str,
        region: str | None,
        reason: str = "creating machine",
    ) -> Attempt:
        """``create_attempt`` and the run's move to ``creating``, in one transaction: what a
        driver commits before it asks the API for the attempt's machine."""
        try:
            with self._write() as db:
                attempt = self._insert_attempt(db, run_id, number, submit_id, region)
                self._transition(db, run_id, "creating", reason, None, number, {})
                return attempt
        except StoreIntegrityError as exc:
            raise self._attempt_taken(run_id, number, submit_id, exc) from exc

    @staticmethod
    def _attempt_taken(
        run_id: str, number: int, submit_id: str, exc: StoreIntegrityError
    ) -> StoreIntegrityError:
        return StoreIntegrityError(
            f"run {run_id} already has attempt {number}, or submit id {submit_id!r} is "
            f"taken ({exc})"
        )

    def _insert_attempt(
        self, db: sa.Connection, run_id: str, number: int, submit_id: str, region: str | None
    ) -> Attempt:
        now = self._clock.now()
        values: dict[str, Any] = {
            "run_id": run_id,
            "number": number,
            "submit_id": submit_id,
            "machine_id": None,
            "instance_id": None,
            "region": region,
            "state": "creating",
            "outcome": None,
            "exit_code": None,
            "oom_killed": None,
            "signal": None,
            "requested_stop": None,
            "reason": None,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
            "logs_copied_at": None,
        }
        self._require_run(db, run_id)
        result = db.execute(attempts.insert().values(values))
        attempt_id = result.inserted_primary_key[0] if result.inserted_primary_key else 0
        db.execute(
            runs.update()
            .where(runs.c.id == run_id)
            .values(
                attempts=sa.case((runs.c.attempts < number, number), else_=runs.c.attempts),
                next_attempt_at=None,
                updated_at=now,
            )
        )
        return Attempt(id=int(attempt_id), **values)

    def advance_attempt(
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
        """Set attempt fields and move the run to ``to_state`` (if it is in ``from_states``), in
        one transaction: a machine created (``starting``) or seen started (``running``)."""
        _check_fields(fields, ATTEMPT_FIELDS, "an attempt")
        _check_aware(fields)
        extra = dict(run_fields or {})
        _check_fields(extra, RUN_FIELDS, "a run")
        _check_aware(extra)
        where = (attempts.c.run_id == run_id, attempts.c.number == number)
        with self._write() as db:
            if fields:
                db.execute(attempts.update().where(*where).values(fields))
            row = db.execute(attempts.select().where(*where)).first()
            if row is None:
                raise AttemptNotFound(run_id, number)
            self._transition(db, run_id, to_state, reason, from_states, number, extra)
        return Attempt.from_row(row)

    def end_attempt(
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
        """Record how an attempt ended (``attempt_fields``) and what follows, in one transaction:
        the run's ``outcome`` (exactly once, as ``finish_run``), or a requeue until
        ``requeue_at``; either way ``owner`` lets go of its claim. Returns the run as it is now."""
        if (outcome is None) == (requeue_at is None):
            raise ValueError("end_attempt needs exactly one of outcome or requeue_at")
        if outcome is not None and outcome not in TERMINAL_STATES:
            raise ValueError(f"outcome must be one of {sorted(TERMINAL_STATES)}, not {outcome!r}")
        fields = dict(attempt_fields)
        attempt_outcome = fields.get("outcome")
        if attempt_outcome is not None and attempt_outcome not in ATTEMPT_OUTCOMES:
            raise ValueError(
                f"outcome must be one of {sorted(ATTEMPT_OUTCOMES)}, not {attempt_outcome!r}"
            )
        _check_fields(fields, ATTEMPT_FIELDS, "an attempt")
        _check_aware({**fields, "requeue_at": requeue_at})
        with self._write() as db:
            updated = db.execute(
                attempts.update()
                .where(attempts.c.run_id == run_id, attempts.c.number == number)
                .values(fields)
            ).rowcount
            if updated != 1:
                raise AttemptNotFound(run_id, number)
            if outcome is not None:
                self._transition(
                    db, run_id, outcome, reason, ACTIVE_STATES, None, {"exit_code": exit_code}
                )
            else:
                self._transition(
                    db,
                    run_id,
                    "pending",
                    requeue_reason,
                    ACTIVE_STATES,
                    number,
                    {"next_attempt_at": requeue_at},
                )
            db.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.owner == owner)
                .values(owner=None, owner_expires_at=None)
            )
            if requeue_at is not None and db.dialect.name == "postgresql":
                db.execute(sa.select(sa.func.pg_notify(WAKEUP_CHANNEL, "")))
            row = db.execute(runs.select().where(runs.c.id == run_id)).one()
        return Run.from_row(row)

    def update_attempt(self, run_id: str, number: int, **fields: Any) -> Attempt:
        """Set attempt fields (machine_id, instance_id, region, state, outcome, exit_code,
        oom_killed, signal, requested_stop, reason, started_at, finished_at); returns the row."""
        _check_fields(fields, ATTEMPT_FIELDS, "an attempt")
        _check_aware(fields)
        outcome = fields.get("outcome")
        if outcome is not None and outcome not in ATTEMPT_OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(ATTEMPT_OUTCOMES)}, not {outcome!r}")
        where = (attempts.c.run_id == run_id, attempts.c.number == number)
        with self._write() as db:
            if fields:
                db.execute(attempts.update().where(*where).values(fields))
            row = db.execute(attempts.select().where(*where)).first()
        if row is None:
            raise AttemptNotFound(run_id, number)
        return Attempt.from_row(row)

    def get_attempts(self, run_id: str) -> list[Attempt]:
        """The run's attempts in order."""
        query = attempts.select().where(attempts.c.run_id == run_id).order_by(attempts.c.number)
        with self._read() as db:
            return [Attempt.from_row(row) for row in db.execute(query)]

    def latest_attempt(self, run_id: str) -> Attempt | None:
        """The run's highest-numbered attempt, if any."""
        query = (
            attempts.select()
            .where(attempts.c.run_id == run_id)
            .order_by(attempts.c.number.desc())
            .limit(1)
        )
        with self._read() as db:
            row = db.execute(query).first()
        return Attempt.from_row(row) if row is not None else None

    def find_attempt_by_machine(self, machine_id: str) -> Attempt | None:
        """The (newest) attempt that ran on this machine, if any."""
        query = (
            attempts.select()
            .where(attempts.c.machine_id == machine_id)
            .order_by(attempts.c.id.desc())
            .limit(1)
        )
        with self._read() as db:
            row = db.execute(query).first()
        return Attempt.from_row(row) if row is not None else None

    def attempts_missing_logs(
        self, *, backend: str, finished_before: datetime, since: datetime, limit: int
    ) -> list[Attempt]:
        """Finished attempts (between ``since`` and ``finished_before``) of ``backend`` whose
        log lines were never known to be all copied: their driver died after recording the
        outcome and before the drain ended. Oldest first."""
        _check_aware({"finished_before": finished_before, "since": since})
        query = (
            attempts.select()
            .join(runs, runs.c.id == attempts.c.run_id)
            .where(
                runs.c.backend == backend,
                attempts.c.machine_id.is_not(None),
                attempts.c.logs_copied_at.is_(None),
                attempts.c.finished_at.is_not(None),
                attempts.c.finished_at < finished_before,
                attempts.c.finished_at >= since,
            )
            .order_by(attempts.c.finished_at)
            .limit(limit)
        )
        with self._read() as db:
            return [Attempt.from_row(row) for row in db.execute(query)]

    def machine_ids_of_live_runs(self) -> set[str]:
        """Machine ids of every attempt of every unfinished run (machines not to reap)."""
        query = (
            sa.select(attempts.c.machine_id)
            .distinct()
            .join(runs, runs.c.id == attempts.c.run_id)
            .where(runs.c.state.in_(ACTIVE_STATES), attempts.c.machine_id.is_not(None))
        )
        with self._read() as db:
            return {row.machine_id for row in db.execute(query)}

    # ----- claims -----

    def claim_run(self, run_id: str, owner: str, ttl_s: float) -> bool:
        """Make ``owner`` the run's driver for ``ttl_s`` seconds, if the run is unfinished and
        unclaimed, its claim expired, or ``owner`` already holds it. One conditional UPDATE, so
        of several racing claimers exactly one wins."""

        def claimable(now: datetime) -> sa.ColumnElement[bool]:
            return sa.or_(
                runs.c.owner.is_(None),
                runs.c.owner_expires_at.is_(None),
                runs.c.owner_expires_at < now,
                runs.c.owner == owner,
            )

        return self._set_owner(run_id, owner, ttl_s, claimable)

    def takeover_claim(
        self, run_id: str, expected_owner: str | None, owner: str, ttl_s: float
    ) -> bool:
        """Take the claim from ``expected_owner`` (e.g. a process known to be dead), only if it
        still holds it; False when someone else got there first."""
        current = (
            runs.c.owner.is_(None) if expected_owner is None else runs.c.owner == expected_owner
        )
        return self._set_owner(run_id, owner, ttl_s, lambda _now: current)

    def _set_owner(
        self,
        run_id: str,
        owner: str,
        ttl_s: float,
        condition: Callable[[datetime], sa.ColumnElement[bool]],
    ) -> bool:
        with self._write() as db:
            now = self._claim_now(db)
            changed = db.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.state.in_(ACTIVE_STATES), condition(now))
                .values(owner=owner, owner_expires_at=now + timedelta(seconds=ttl_s))
            ).rowcount
        return changed == 1

    def renew_claim(self, run_id: str, owner: str, ttl_s: float) -> bool:
        """Extend ``owner``'s claim by ``ttl_s`` from now; False if ``owner`` no longer holds it."""
        with self._write() as db:
            expires = self._claim_now(db) + timedelta(seconds=ttl_s)
            changed = db.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.owner == owner)
                .values(owner_expires_at=expires)
            ).rowcount
        return changed == 1

    def renew_claims(self, owner: str, ttl_s: float) -> set[str]:
        """Extend every claim ``owner`` holds, in one statement; the ids it still holds.

        A driver of many runs calls this once per interval instead of once per run; a run it
        believes it drives but that is missing here was taken over, and it must let it go.
        """
        with self._write() as db:
            expires = self._claim_now(db) + timedelta(seconds=ttl_s)
            rows = db.execute(
                runs.update()
                .where(runs.c.owner == owner)
                .values(owner_expires_at=expires)
                .returning(runs.c.id)
            ).all()
        return {row.id for row in rows}

    def cancel_requests(self, owner: str) -> set[str]:
        """Ids of the unfinished runs ``owner`` holds whose cancel was requested (one query)."""
        query = sa.select(runs.c.id).where(
            runs.c.owner == owner,
            runs.c.cancel_requested.is_(True),
            runs.c.state.in_(ACTIVE_STATES),
        )
        with self._read() as db:
            return {row.id for row in db.execute(query)}

    def release_claim(self, run_id: str, owner: str) -> None:
        """Give up ``owner``'s claim (no-op if it does not hold it)."""
        with self._write() as db:
            db.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.owner == owner)
                .values(owner=None, owner_expires_at=None)
            )

    def _claim_now(self, db: sa.Connection) -> datetime:
        """The time claims are stamped with: the database server's on PostgreSQL, where hosts
        with different clocks compare them; this process's clock on SQLite (one host)."""
        if db.dialect.name == "postgresql":
            value = db.execute(sa.select(sa.func.now())).scalar_one()
            assert isinstance(value, datetime)
            return value.astimezone(UTC)
        return self._clock.now()

    def claim_due(
        self,
        owner: str,
        *,
        backend: str,
        queues: Sequence[str],
        limit: int,
        ttl_s: float,
        queue_limits: Mapping[str, int] | None = None,
    ) -> list[Run]:
        """Claim up to ``limit`` due queued runs of ``queues`` for ``owner``, highest priority
        first, then the longest due; return them.

        One conditional statement per call (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so claimers
        never wait on each other; on SQLite ``BEGIN IMMEDIATE`` serialises them). A queue named
        in ``queue_limits`` never has more than that many claimed unfinished runs, counted over
        every worker sharing the ledger.
        """
        if limit <= 0 or not queues:
            return []
        limits = dict(queue_limits or {})
        wanted = sorted(set(queues))
        with self._write() as db:
            now = self._claim_now(db)
            # Held to commit: two workers filling the same limited queue take turns.
            _advisory_locks(db, "jr.q", [q for q in wanted if q in limits])
            room: dict[str, int | None] = {
                q: self._queue_room(db, q, limits[q], now) if q in limits else None for q in wanted
            }
            picked = self._pick_due(db, backend, room, limit, now)
            if not picked:
                return []
            rows = db.execute(
                runs.update()
                .where(runs.c.id.in_(picked))
                .values(
                    owner=owner, owner_expires_at=now + timedelta(seconds=ttl_s), updated_at=now
                )
                .returning(*runs.c)
            ).all()
        claimed = [Run.from_row(row) for row in rows]
        claimed.sort(key=lambda r: (-r.priority, r.next_attempt_at or r.created_at, r.id))
        return claimed

    def _queue_room(self, db: sa.Connection, queue: str, cap: int, now: datetime) -> int:
        in_flight = db.execute(
            sa.select(sa.func.count())
            .select_from(runs)
            .where(
                runs.c.queue == queue,
                runs.c.state.in_(ACTIVE_STATES),
                runs.c.owner.is_not(None),
                runs.c.owner_expires_at >= now,
            )
        ).scalar_one()
        return max(0, cap - int(in_flight))

    def _pick_due(
        self,
        db: sa.Connection,
        backend: str,
        room: dict[str, int | None],
        limit: int,
        now: datetime,
    ) -> list[str]:
        """Ids of the due claimable runs to claim, in one order across all the queues (priority,
        then due time), skipping runs of queues whose limit (``room``; None: no limit) is used
        up. Locks them on PostgreSQL, skipping rows other claimers hold."""
        due = sa.func.coalesce(runs.c.next_attempt_at, runs.c.created_at)
        room = dict(room)
        picked: list[str] = []
        while len(picked) < limit:
            open_queues = [q for q, left in room.items() if left is None or left > 0]
            if not open_queues:
                break
            query = (
                sa.select(runs.c.id, runs.c.queue)
                .where(
                    runs.c.state == "pending",
                    runs.c.queue.in_(open_queues),
                    runs.c.backend == backend,
                    sa.or_(runs.c.owner.is_(None), runs.c.owner_expires_at < now),
                    sa.or_(runs.c.next_attempt_at.is_(None), runs.c.next_attempt_at <= now),
                )
                .order_by(runs.c.priority.desc(), due, runs.c.id)
                .limit(limit - len(picked))
                .with_for_update(skip_locked=True)
            )
            if picked:
                query = query.where(runs.c.id.not_in(picked))
            rows = db.execute(query).all()
            queue_filled = False
            for row in rows:
                left = room[row.queue]
                if left is None:
                    picked.append(row.id)
                elif left > 0:
                    picked.append(row.id)
                    room[row.queue] = left - 1
                else:
                    queue_filled = True  # look again without that queue
            if not queue_filled:
                break  # every row found was taken: there are no more
        return picked

    def claim_orphans(
        self, owner: str, *, backend: str, limit: int, ttl_s: float, dead_owners: Collection[str]
    ) -> list[Run]:
        """Adopt up to ``limit`` unfinished runs of ``backend`` that nobody drives: claims that
        expired, owners in ``dead_owners`` (processes known dead), and runs left unclaimed
        outside a queue (a driver released them, or died before claiming). Queued runs waiting
        for their turn are not orphans: ``claim_due`` hands those out."""
        if limit <= 0:
            return []
        with self._write() as db:
            now = self._claim_now(db)
            unowned = sa.or_(
                runs.c.owner_expires_at < now,
                runs.c.owner.in_(list(dead_owners)) if dead_owners else sa.false(),
                sa.and_(
                    runs.c.owner.is_(None),
                    sa.or_(runs.c.queue.is_(None), runs.c.state != "pending"),
                ),
            )
            picked = (
                sa.select(runs.c.id)
                .where(
                    runs.c.state.in_(ACTIVE_STATES),
                    runs.c.backend == backend,
                    unowned,
                    sa.or_(runs.c.next_attempt_at.is_(None), runs.c.next_attempt_at <= now),
                )
                .order_by(runs.c.created_at, runs.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            rows = db.execute(
                runs.update()
                .where(runs.c.id.in_(picked.scalar_subquery()))
                .values(owner=owner, owner_expires_at=now + timedelta(seconds=ttl_s))
                .returning(*runs.c)
            ).all()
        return sorted((Run.from_row(row) for row in rows), key=lambda r: (r.created_at, r.id))

    def claim_owners(self, backend: str) -> set[str]:
        """The distinct owners holding unfinished runs of ``backend`` (to check for dead ones)."""
        query = (
            sa.select(runs.c.owner)
            .distinct()
            .where(
                runs.c.state.in_(ACTIVE_STATES),
                runs.c.backend == backend,
                runs.c.owner.is_not(None),
            )
        )
        with self._read() as db:
            return {row.owner for row in db.execute(query)}

    def requeue_run(
        self,
        run_id: str,
        owner: str,
        *,
        next_attempt_at: datetime,
        reason: str,
        attempt_number: int,
    ) -> bool:
        """Put a run back to ``pending`` until ``next_attempt_at`` and drop ``owner``'s claim,
        in one transaction: nobody holds a run while it waits for its retry."""
        _check_aware({"next_attempt_at": next_attempt_at})
        with self._write() as db:
            current = db.execute(
                sa.select(runs.c.state)
                .where(runs.c.id == run_id, runs.c.owner == owner)
                .with_for_update()
            ).first()
            if current is None or current.state not in ACTIVE_STATES:
                return False
            now = self._clock.now()
            db.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(
                    state="pending",
                    next_attempt_at=next_attempt_at,
                    owner=None,
                    owner_expires_at=None,
                    updated_at=now,
                )
            )
            self._record(db, run_id, current.state, "pending", reason, attempt_number, now)
            if db.dialect.name == "postgresql":
                db.execute(sa.select(sa.func.pg_notify(WAKEUP_CHANNEL, "")))
        return True

    def retry_run(self, run_id: str, *, extra_attempts: int) -> Run:
        """Give a finished (usually ``dead``) run ``extra_attempts`` more attempts and queue it
        again, under the same id; its history stays. Raises RunNotFound, or ValueError when the
        run is not finished."""
        if extra_attempts < 1:
            raise ValueError(f"extra_attempts must be at least 1, not {extra_attempts}")
        with self._write() as db:
            row = db.execute(runs.select().where(runs.c.id == run_id).with_for_update()).first()
            if row is None:
                raise RunNotFound(run_id)
            if row.state not in TERMINAL_STATES:
                raise ValueError(
                    f"run {run_id} is still {row.state}; only a finished run can be retried"
                )
            now = self._clock.now()
            db.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(
                    state="pending",
                    max_attempts=row.attempts + extra_attempts,
                    cancel_requested=False,
                    exit_code=None,
                    reason=None,
                    next_attempt_at=None,
                    finished_at=None,
                    owner=None,
                    owner_expires_at=None,
                    queue=row.queue or "default",
                    updated_at=now,
                )
            )
            self._record(db, run_id, row.state, "pending", "retried by the user", None, now)
            if db.dialect.name == "postgresql":
                db.execute(sa.select(sa.func.pg_notify(WAKEUP_CHANNEL, "")))
            fresh = db.execute(runs.select().where(runs.c.id == run_id)).one()
        return Run.from_row(fresh)

    def queue_stats(self) -> list[dict[str, Any]]:
        """Per queue: runs waiting, runs in flight, dead runs (for ``jobrunner queues``).

        A ``pending`` run a worker has claimed is in flight (as queue limits count it), not
        waiting."""
        claimed = runs.c.owner.is_not(None).label("claimed")
        query = (
            sa.select(runs.c.queue, runs.c.state, claimed, sa.func.count().label("n"))
            .where(runs.c.queue.is_not(None))
            .group_by(runs.c.queue, runs.c.state, claimed)
        )
        stats: dict[str, dict[str, Any]] = {}
        with self._read() as db:
            for row in db.execute(query):
                entry = stats.setdefault(
                    row.queue, {"queue": row.queue, "pending": 0, "in_flight": 0, "dead": 0}
                )
                if row.state == "pending" and not row.claimed:
                    entry["pending"] += row.n
                elif row.state in ACTIVE_STATES:
                    entry["in_flight"] += row.n
                elif row.state == "dead":
                    entry["dead"] += row.n
        return sorted(stats.values(), key=lambda e: str(e["queue"]))

    # ----- schedules -----

    def schedule_states(self, names: Collection[str] | None = None) -> dict[str, ScheduleState]:
        """The ledger's state of the named schedules (all when None) that it knows."""
        if names is None:
            chunks: list[list[str] | None] = [None]
        else:
            wanted = list(names)
            chunks = [wanted[i : i + FIRE_BATCH] for i in range(0, len(wanted), FIRE_BATCH)]
        found: dict[str, ScheduleState] = {}
        with self._read() as db:
            for chunk in chunks:  # bounded IN lists: SQLite allows 32,766 parameters at most
                query = schedules_table.select()
                if chunk is not None:
                    query = query.where(schedules_table.c.name.in_(chunk))
                found.update((row.name, ScheduleState.from_row(row)) for row in db.execute(query))
        return found

    def ensure_schedules(self, names: Collection[str], *, since: datetime) -> None:
        """Start tracking schedules seen for the first time: their ticks after ``since`` are
        decided from now on (nothing before a schedule existed is caught up)."""
        _check_aware({"since": since})
        if not names:
            return
        now = self._clock.now()
        rows = [
            {
                "name": n,
                "decided_until": since,
                "paused": False,
                "created_at": now,
                "updated_at": now,
            }
            for n in names
        ]
        with self._write() as db:
            dialect_insert = postgresql.insert if db.dialect.name == "postgresql" else sqlite.insert
            db.execute(dialect_insert(schedules_table).on_conflict_do_nothing(), rows)

    def set_schedule_paused(self, name: str, paused: bool) -> None:
        """Pause or resume a schedule (kept in the ledger, so every scheduler sees it)."""
        now = self._clock.now()
        with self._write() as db:
            dialect_insert = postgresql.insert if db.dialect.name == "postgresql" else sqlite.insert
            statement = dialect_insert(schedules_table).values(
                name=name, decided_until=now, paused=paused, created_at=now, updated_at=now
            )
            db.execute(
                statement.on_conflict_do_update(
                    index_elements=["name"], set_={"paused": paused, "updated_at": now}
                )
            )

    def prepare_fires(self, decisions: Sequence[FireDecision]) -> PreparedFires:
        """Build the rows of the runs ``decisions`` fire ahead of time (ids, snapshots in the
        database's form), so that ``record_fires`` at the tick only has to send them."""
        writers = self._fire_writers(self._engine.dialect)
        placeholder = self._clock.now()
        rows = {
            i: _new_run_row(d.run, placeholder)
            for i, d in enumerate(decisions)
            if d.decision == "fired" and d.run is not None
        }
        values = dict(zip(rows, writers.runs.convert_many(list(rows.values())), strict=True))
        return PreparedFires(list(decisions), rows, values)

    def record_fires(
        self,
        decisions: Sequence[FireDecision] | PreparedFires,
        *,
        decided_until: Mapping[str, datetime],
    ) -> list[Fire]:
        """Record tick decisions and queue the runs of the fired ones, in one transaction per
        batch; then move each schedule's ``decided_until`` forward (never back).

        A decision whose (schedule, scheduled_for) is already recorded (another scheduler got
        there first) is dropped with its run: only the returned fires were recorded here.
        ``decisions`` may come from ``prepare_fires`` (the runs' rows built ahead); their
        ``created_at`` is still the moment they are recorded.
        """
        prepared = decisions if isinstance(decisions, PreparedFires) else None
        listed = decisions.decisions if isinstance(decisions, PreparedFires) else list(decisions)
        batches: list[tuple[list[FireDecision], dict[int, tuple[dict[str, Any], list[Any]]] | None]]
        batches = []
        for start in range(0, max(len(listed), 1), FIRES_PER_TRANSACTION):
            batch = listed[start : start + FIRES_PER_TRANSACTION]
            ahead = None
            if prepared is not None:
                ahead = {
                    i - start: (prepared.run_rows[i], prepared.run_values[i])
                    for i in range(start, start + len(batch))
                    if i in prepared.run_rows
                }
            batches.append((batch, ahead))

        def write(batch: list[FireDecision], ahead: Any, advance: bool) -> list[Fire]:
            with self._write() as db:
                fires = self._record_fire_batch(db, batch, ahead)
                if advance:
                    self._advance_schedules(db, decided_until)
                if db.dialect.name == "postgresql" and any(f.run_id for f in fires):
                    db.execute(sa.select(sa.func.pg_notify(WAKEUP_CHANNEL, "")))
            return fires

        *first, (last_batch, last_ahead) = batches
        recorded: list[Fire] = []
        if first and self._engine.dialect.name == "postgresql":
            # Two transactions at a time: the server checks one batch's indexes and foreign
            # keys on one core while this process sends the next (10,000 fires: about a third
            # faster). SQLite has one writer, so there they go one after another.
            with ThreadPoolExecutor(2, thread_name_prefix="jobrunner-fires") as pool:
                for fires in pool.map(lambda item: write(item[0], item[1], advance=False), first):
                    recorded += fires
        else:
            for batch, ahead in first:
                recorded += write(batch, ahead, advance=False)
        # decided_until moves only once every tick before it is recorded (committed above): a
        # crash in between leaves the ticks undecided, never skipped.
        recorded += write(last_batch, last_ahead, advance=True)
        return recorded

    def _record_fire_batch(
        self,
        db: sa.Connection,
        batch: Sequence[FireDecision],
        ahead: Mapping[int, tuple[dict[str, Any], list[Any]]] | None = None,
    ) -> list[Fire]:
        """Record one batch in four statements whatever its size (runs, fires, transitions,
        and the cancels of ``replace``), through ``BulkInsert``: a burst of thousands of fires
        is bound by the database, not by per-row work in Python."""
        if not batch:
            return []
        now = self._clock.now()
        writers = self._fire_writers(db.dialect)
        # A schedule's fires share one snapshot: its files' blobs are written once, if missing.
        self._put_snapshot_blobs(
            db, [d.run.job_snapshot for d in batch if d.decision == "fired" and d.run is not None]
        )
        # The runs go in first, since the fire rows reference them; a fire row that loses to
        # another scheduler's (same schedule and tick) takes its run back out below.
        if ahead is None:
            run_rows = {
                index: _new_run_row(d.run, now)
                for index, d in enumerate(batch)
                if d.decision == "fired" and d.run is not None
            }
            run_values = writers.runs.convert_many(list(run_rows.values()))
        else:  # built by prepare_fires: only the moment of recording is filled in
            run_rows = {index: row for index, (row, _) in ahead.items()}
            run_values = [values for _, values in ahead.values()]
            writers.runs.stamp(run_values, {"created_at": now, "updated_at": now})
        writers.runs.execute(db, run_values)
        fire_rows = [
            {
                "schedule": d.schedule,
                "scheduled_for": d.scheduled_for,
                "decision": d.decision,
                "reason": d.reason,
                "trigger": d.trigger,
                "run_id": run_rows[i]["id"] if i in run_rows else None,
                "decided_at": now,
            }
            for i, d in enumerate(batch)
        ]
        converted = writers.fires.convert_many(fire_rows)
        inserted = {(r[1], r[2]): int(r[0]) for r in writers.fires.execute(db, converted)}
        # (schedule, scheduled_for) as the driver returns it is what convert_many() sent.
        keys = [(values[0], values[1]) for values in converted]
        ours = [i for i, key in enumerate(keys) if key in inserted]
        lost = [run_rows[i]["id"] for i in run_rows if keys[i] not in inserted]
        if lost:  # decided by another scheduler: its fire (and run) stand, ours never existed
            db.execute(runs.delete().where(runs.c.id.in_(lost)))
        kept = {i: run_rows[i] for i in ours if i in run_rows}
        uses = [
            {"run_id": row["id"], "sha256": digest}
            for row in kept.values()
            for digest in snapshot_blob_refs(row["job_snapshot"])
        ]
        if uses:
            db.execute(run_blobs.insert(), uses)
        writers.transitions.execute(
            db,
            writers.transitions.convert_many(
                [
                    {
                        "run_id": row["id"],
                        "attempt_number": None,
                        "from_state": None,
                        "to_state": "pending",
                        "reason": "submitted"
                        if row["queue"] is None
                        else f"enqueued on {row['queue']}",
                        "at": now,
                    }
                    for row in kept.values()
                ]
            ),
        )
        replacing = {batch[i].schedule for i in kept if batch[i].replace_running}
        new_ids = [row["id"] for row in kept.values()]
        for schedule in sorted(replacing):
            self._cancel_schedule_runs(db, schedule, now, sparing=new_ids)
        return [
            Fire(
                id=inserted[keys[i]],
                schedule=batch[i].schedule,
                scheduled_for=batch[i].scheduled_for,
                decision=batch[i].decision,
                reason=batch[i].reason,
                trigger=batch[i].trigger,
                run_id=kept[i]["id"] if i in kept else None,
                decided_at=now,
            )
            for i in ours
        ]

    def _fire_writers(self, dialect: sa.engine.Dialect) -> _FireWriters:
        writers = self._fire_writer_cache.get(dialect.name)
        if writers is None:
            writers = self._fire_writer_cache[dialect.name] = _FireWriters(dialect)
        return writers

    def _cancel_schedule_runs(
        self, db: sa.Connection, schedule: str, now: datetime, *, sparing: Sequence[str] = ()
    ) -> None:
        running = sa.select(fires.c.run_id).where(
            fires.c.schedule == schedule, fires.c.run_id.is_not(None)
        )
        db.execute(
            runs.update()
            .where(
                runs.c.id.in_(running),
                runs.c.id.not_in(list(sparing)),
                runs.c.state.in_(ACTIVE_STATES),
            )
            .values(cancel_requested=True, updated_at=now)
        )

    def _advance_schedules(self, db: sa.Connection, decided_until: Mapping[str, datetime]) -> None:
        # Usually one moment for every schedule of a pass: one UPDATE per FIRE_BATCH names.
        by_until: dict[datetime, list[str]] = {}
        for name, until in decided_until.items():
            by_until.setdefault(until, []).append(name)
        now = self._clock.now()
        for until, names in by_until.items():
            if db.dialect.name == "postgresql":  # one array parameter, however many names
                db.execute(
                    schedules_table.update()
                    .where(
                        schedules_table.c.name == sa.func.any(sa.cast(names, ARRAY(sa.Text))),
                        schedules_table.c.decided_until < until,
                    )
                    .values(decided_until=until, updated_at=now)
                )
                continue
            for start in range(0, len(names), FIRE_BATCH):
                db.execute(
                    schedules_table.update()
                    .where(
                        schedules_table.c.name.in_(names[start : start + FIRE_BATCH]),
                        schedules_table.c.decided_until < until,
                    )
                    .values(decided_until=until, updated_at=now)
                )

    def paused_schedules(self) -> set[str]:
        """The schedules paused by ``jobrunner schedules pause`` (one short query: the
        scheduler asks at every tick it decided ahead)."""
        with self._read() as db:
            query = sa.select(schedules_table.c.name).where(schedules_table.c.paused)
            return {row.name for row in db.execute(query)}

    def running_schedules(self, names: Collection[str]) -> set[str]:
        """Which of these schedules have an unfinished run (for the overlap rules)."""
        if not names:
            return set()
        found: set[str] = set()
        wanted = list(names)
        with self._read() as db:
            for start in range(0, len(wanted), FIRE_BATCH):
                query = (
                    sa.select(fires.c.schedule)
                    .distinct()
                    .join(runs, runs.c.id == fires.c.run_id)
                    .where(
                        fires.c.schedule.in_(wanted[start : start + FIRE_BATCH]),
                        runs.c.state.in_(ACTIVE_STATES),
                    )
                )
                found.update(row.schedule for row in db.execute(query))
        return found

    def list_fires(
        self, schedule: str | None = None, *, limit: int = 50, before_id: int | None = None
    ) -> list[Fire]:
        """Fire decisions, newest first (of one schedule, or all)."""
        query = fires.select()
        if schedule is not None:
            query = query.where(fires.c.schedule == schedule)
        if before_id is not None:
            query = query.where(fires.c.id < before_id)
        query = query.order_by(fires.c.id.desc()).limit(limit)
        with self._read() as db:
            return [Fire.from_row(row) for row in db.execute(query)]

    def last_fires(self, names: Collection[str]) -> dict[str, Fire]:
        """Each schedule's newest fire decision."""
        newest = (
            sa.select(sa.func.max(fires.c.id)).where(fires.c.schedule.in_(list(names)))
        ).group_by(fires.c.schedule)
        with self._read() as db:
            rows = db.execute(fires.select().where(fires.c.id.in_(newest)))
            return {row.schedule: Fire.from_row(row) for row in rows}

    def prune_schedule_runs(self, schedule: str, *, keep: int) -> int:
        """Delete the finished runs of ``schedule`` beyond its newest ``keep`` (with their
        attempts, transitions and logs); the fire rows stay, without their run. Returns how
        many runs were deleted."""
        return self.prune_schedules_runs({schedule: keep}).get(schedule, 0)

    def prune_schedules_runs(self, keep: Mapping[str, int]) -> dict[str, int]:
        """``prune_schedule_runs`` for many schedules (name -> runs to keep): one query per
        FIRE_BATCH schedules, not one transaction per schedule. Returns the deletions per
        schedule (schedules with none left out)."""
        by_keep: dict[int, list[str]] = {}
        for name, count in keep.items():
            by_keep.setdefault(count, []).append(name)
        removed: dict[str, int] = {}
        for count, names in sorted(by_keep.items()):
            for start in range(0, len(names), FIRE_BATCH):
                chunk = names[start : start + FIRE_BATCH]
                newest_first = sa.func.row_number().over(
                    partition_by=fires.c.schedule,
                    order_by=(runs.c.created_at.desc(), runs.c.id.desc()),
                )
                ranked = (
                    sa.select(runs.c.id, fires.c.schedule, newest_first.label("place"))
                    .join(fires, fires.c.run_id == runs.c.id)
                    .where(fires.c.schedule.in_(chunk), runs.c.state.in_(TERMINAL_STATES))
                    .subquery()
                )
                with self._write() as db:
                    doomed = db.execute(
                        sa.select(ranked.c.id, ranked.c.schedule).where(ranked.c.place > count)
                    ).all()
                    self._delete_runs(db, [row.id for row in doomed])
                for row in doomed:
                    removed[row.schedule] = removed.get(row.schedule, 0) + 1
        return removed

    @staticmethod
    def _delete_runs(db: sa.Connection, doomed: Sequence[str]) -> None:
        chunks = [doomed[i : i + FIRE_BATCH] for i in range(0, len(doomed), FIRE_BATCH)]
        used: set[str] = set()
        for chunk in chunks:
            query = sa.select(run_blobs.c.sha256).where(run_blobs.c.run_id.in_(chunk))
            used.update(db.execute(query).scalars())
        if used and db.dialect.name == "postgresql":
            # Before any row is touched: no run that uses one of these blobs commits meanwhile.
            db.execute(sa.select(sa.func.pg_advisory_xact_lock(BLOB_LOCK)))
        for chunk in chunks:
            # Not every database enforces ON DELETE for us: clear the references first.
            db.execute(fires.update().where(fires.c.run_id.in_(chunk)).values(run_id=None))
            for table in (log_lines, transitions_table, attempts, run_blobs):
                db.execute(table.delete().where(table.c.run_id.in_(chunk)))
            db.execute(runs.delete().where(runs.c.id.in_(chunk)))
        # The file contents only these runs used go with them.
        candidates = sorted(used)
        for start in range(0, len(candidates), FIRE_BATCH):
            db.execute(
                blobs_table.delete().where(
                    blobs_table.c.sha256.in_(candidates[start : start + FIRE_BATCH]),
                    ~sa.exists().where(run_blobs.c.sha256 == blobs_table.c.sha256),
                )
            )

    # ----- rate limits -----

    def take_rate_token(self, key: str, rate: float, burst: int) -> float:
        """Take one token from the shared bucket ``key`` (refilled at ``rate`` per second, at
        most ``burst``); the seconds the caller must wait before its call (0: go now).

        One transaction, serialised per bucket (a row lock on PostgreSQL, ``BEGIN IMMEDIATE`` on
        SQLite), stamped with the database's clock, so processes on several hosts share it.
        """
        if rate <= 0 or burst < 1:
            raise ValueError(f"a bucket needs rate > 0 and burst >= 1, got {rate} and {burst}")
        with self._write() as db:
            now = self._claim_now(db)
            dialect_insert = postgresql.insert if db.dialect.name == "postgresql" else sqlite.insert
            db.execute(
                dialect_insert(rate_buckets)
                .values(key=key, tokens=float(burst), updated_at=now)
                .on_conflict_do_nothing(index_elements=["key"])
            )
            row = db.execute(
                rate_buckets.select().where(rate_buckets.c.key == key).with_for_update()
            ).one()
            last: datetime = row.updated_at
            elapsed = max(0.0, (now - last).total_seconds())
            tokens: float = min(float(burst), float(row.tokens) + elapsed * rate) - 1.0
            db.execute(
                rate_buckets.update()
                .where(rate_buckets.c.key == key)
                .values(tokens=tokens, updated_at=max(now, last))
            )
        return max(0.0, -tokens / rate)

    # ----- logs -----

    def add_logs(self, run_id: str, attempt_number: int, lines: Iterable[LogLineIn]) -> int:
        """Store lines of an attempt's output; returns how many were new. A line whose entry id
        (given, or derived from its content) is already stored for the attempt is skipped."""
        rows = _log_rows(run_id, attempt_number, lines)
        if not rows:
            return 0
        with self._write() as db:
            return self._insert_new_logs(db, rows)

    def _insert_new_logs(self, db: sa.Connection, rows: list[dict[str, Any]]) -> int:
        dialect_insert = postgresql.insert if db.dialect.name == "postgresql" else sqlite.insert
        statement = dialect_insert(log_lines).on_conflict_do_nothing(
            index_elements=["run_id", "attempt_number", "entry_id"]
        )
        if db.dialect.insert_executemany_returning:
            return len(db.execute(statement.returning(log_lines.c.id), rows).all())
        # Old SQLite without RETURNING: count around the insert (BEGIN IMMEDIATE serialises us).
        run_id, attempt = rows[0]["run_id"], rows[0]["attempt_number"]
        count = (
            sa.select(sa.func.count())
            .select_from(log_lines)
            .where(log_lines.c.run_id == run_id, log_lines.c.attempt_number == attempt)
        )
        before = db.execute(count).scalar_one()
        db.execute(statement, rows)
        return int(db.execute(count).scalar_one() - before)

    def get_logs(
        self, run_id: str, *, after_id: int = 0, limit: int | None = None
    ) -> list[LogLine]:
        """The run's stored lines with id > ``after_id``, in the order they were stored."""
        query = (
            log_lines.select()
            .where(log_lines.c.run_id == run_id, log_lines.c.id > after_id)
            .order_by(log_lines.c.id)
        )
        if limit is not None:
            query = query.limit(limit)
        with self._read() as db:
            return [LogLine.from_row(row) for row in db.execute(query)]

    # ----- native schedules -----
    # Added for jobrunner.native (runs of native Fly schedules, imported from machine events).

    def existing_submit_ids(self, submit_ids: Collection[str]) -> set[str]:
        """Which of ``submit_ids`` some attempt already carries."""
        wanted = sorted(set(submit_ids))
        found: set[str] = set()
        with self._read() as db:
            for start in range(0, len(wanted), FIRE_BATCH):
                chunk = wanted[start : start + FIRE_BATCH]
                query = sa.select(attempts.c.submit_id).where(attempts.c.submit_id.in_(chunk))
                found.update(row.submit_id for row in db.execute(query))
        return found

    def import_finished_run(
        self,
        request: RunRequest,
        *,
        outcome: str,
        exit_code: int | None,
        reason: str | None,
        started_at: datetime,
        finished_at: datetime,
        attempt_fields: Sequence[Mapping[str, Any]],
        logs: Mapping[int, Iterable[LogLineIn]] | None = None,
        started_reason: str = "started outside jobrunner",
    ) -> Run | None:
        """Record a run that already happened outside jobrunner (a native schedule's machine
        started and exited): the run in its terminal ``outcome``, its attempts (each mapping holds
        ``submit_id`` and attempt fields, numbered from 1), its transitions at the times they
        happened, and its log lines by attempt number, all in one transaction.

        Returns None, writing nothing, when one of the submit ids is already recorded, so the
        same history imported twice (even by two processes at once) is recorded once."""
        if outcome not in TERMINAL_STATES:
            raise ValueError(f"outcome must be one of {sorted(TERMINAL_STATES)}, not {outcome!r}")
        if not attempt_fields:
            raise ValueError("an imported run needs at least one attempt")
        _check_aware({"started_at": started_at, "finished_at": finished_at})
        submit_ids = [str(fields["submit_id"]) for fields in attempt_fields]
        extras = [{k: v for k, v in f.items() if k != "submit_id"} for f in attempt_fields]
        for extra in extras:
            _check_fields(extra, ATTEMPT_FIELDS, "an attempt")
            _check_aware(extra)
        try:
            with self._write() as db:
                taken = sa.select(attempts.c.id).where(attempts.c.submit_id.in_(submit_ids))
                if db.execute(taken.limit(1)).first() is not None:
                    return None
                self._put_snapshot_blobs(db, [request.job_snapshot])
                run = self._insert_run(db, request)
                db.execute(
                    transitions_table.update()
                    .where(transitions_table.c.run_id == run.id)
                    .values(at=started_at, reason=started_reason)
                )
                numbered = enumerate(zip(submit_ids, extras, strict=True), start=1)
                for number, (submit_id, extra) in numbered:
                    self._insert_attempt(db, run.id, number, submit_id, extra.get("region"))
                    db.execute(
                        attempts.update()
                        .where(attempts.c.run_id == run.id, attempts.c.number == number)
                        .values(created_at=extra.get("started_at") or started_at, **extra)
                    )
                self._record(db, run.id, "pending", "running", started_reason, 1, started_at)
                last = len(submit_ids)
                self._record(db, run.id, "running", outcome, reason, last, finished_at)
                db.execute(
                    runs.update()
                    .where(runs.c.id == run.id)
                    .values(
                        state=outcome,
                        exit_code=exit_code,
                        reason=reason,
                        created_at=started_at,
                        started_at=started_at,
                        finished_at=finished_at,
                        updated_at=self._clock.now(),
                    )
                )
                for number, lines in (logs or {}).items():
                    rows = _log_rows(run.id, number, lines)
                    if rows:
                        self._insert_new_logs(db, rows)
                row = db.execute(runs.select().where(runs.c.id == run.id)).one()
        except StoreIntegrityError:
            if self.existing_submit_ids(submit_ids):
                return None  # another importer recorded it first
            raise
        return Run.from_row(row)


def _log_rows(run_id: str, number: int, lines: Iterable[LogLineIn]) -> list[dict[str, Any]]:
    """The rows to store for an attempt's lines: one per entry id (given, or derived from the
    line), so a line fetched twice is stored once."""
    rows: dict[str, dict[str, Any]] = {}
    for line in lines:
        if line.ts.tzinfo is None:
            raise ValueError(f"log line timestamp must be timezone-aware, got {line.ts!r}")
        key = line.key()
        rows.setdefault(
            key,
            {
                "run_id": run_id,
                "attempt_number": number,
                "entry_id": key,
                "ts": line.ts,
                "stream": line.stream[:16],
                "message": line.message,
            },
        )
    return list(rows.values())
