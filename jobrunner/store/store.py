"""The run ledger's operations: every SQL statement jobrunner runs lives here.

Each public method is one transaction. Every change of a run's state is a conditional UPDATE and
writes its ``run_transitions`` row in the same transaction, so the history can never disagree
with the current state, and two processes racing to finish a run cannot both succeed.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from jobrunner.states import ACTIVE_STATES, RUN_STATES, TERMINAL_STATES
from jobrunner.store.engine import (
    READ_OPTION,
    create_store_engine,
    mask_url,
    resolve_url,
    translate_errors,
)
from jobrunner.store.errors import (
    AmbiguousRunId,
    AttemptNotFound,
    InvalidRunId,
    RunNotFound,
    StoreIntegrityError,
)
from jobrunner.store.ids import ALPHABET, ID_LENGTH, new_run_id, normalise_prefix
from jobrunner.store.migrate import upgrade
from jobrunner.store.records import Attempt, LogLine, LogLineIn, Run, Transition
from jobrunner.store.tables import METADATA, AttemptRow, LogLineRow, RunRow, TransitionRow

__all__ = ["MIN_PREFIX_LENGTH", "Store"]

logger = logging.getLogger(__name__)

MIN_PREFIX_LENGTH = 6
BACKENDS = frozenset({"local", "fly"})

# The statements below use the Core tables of the SQLModel models (typed, and no ORM session).
runs = METADATA.tables[RunRow.__tablename__]
attempts = METADATA.tables[AttemptRow.__tablename__]
transitions_table = METADATA.tables[TransitionRow.__tablename__]
log_lines = METADATA.tables[LogLineRow.__tablename__]

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
    }
)


def _now() -> datetime:
    return datetime.now(UTC)


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


def _check_aware(fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError(f"{name} must be a timezone-aware datetime (UTC), got {value!r}")


def _check_fields(given: Iterable[str], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"cannot set {', '.join(unknown)} on {what}; settable: {sorted(allowed)}")


class Store:
    """The run ledger: runs, their attempts, state transitions and log lines.

    ``url`` defaults to ``$JOBRUNNER_DATABASE_URL``, else ``sqlite:///$JOBRUNNER_HOME/jobrunner.db``
    (``JOBRUNNER_HOME`` defaults to ``~/.jobrunner``; its folder is created). Opening a database
    migrates it to this version's schema. Methods are synchronous and thread-safe; returned
    records are frozen dataclasses. Database errors are raised as ``StoreError`` subclasses.
    """

    TERMINAL_STATES: frozenset[str] = TERMINAL_STATES

    def __init__(self, url: str | None = None) -> None:
        self._url = resolve_url(url)
        with translate_errors(self._url):
            self._engine = create_store_engine(self._url)
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
        with translate_errors(self._url), self._engine.begin() as connection:
            yield connection

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with translate_errors(self._url), self._reader.connect() as connection:
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
    ) -> Run:
        """Record a new run in state ``pending`` (with its first transition) and return it."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, not {backend!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        now = _now()
        values: dict[str, Any] = {
            "id": new_run_id(),
            "job_name": job_name,
            "job_snapshot": job_snapshot,
            "backend": backend,
            "app": app,
            "region": region,
            "state": "pending",
            "exit_code": None,
            "reason": None,
            "attempts": 0,
            "max_attempts": max_attempts,
            "timeout_s": timeout_s,
            "trigger": trigger,
            "cancel_requested": False,
            "owner": None,
            "owner_expires_at": None,
            "next_attempt_at": None,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
            "updated_at": now,
        }
        with self._write() as db:
            db.execute(runs.insert().values(values))
            self._record(db, values["id"], None, "pending", "submitted", None, now)
        return Run(**values)

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

    def list_unfinished_runs(self) -> list[Run]:
        """Every run not yet in a terminal state, oldest first."""
        query = runs.select().where(runs.c.state.in_(ACTIVE_STATES))
        with self._read() as db:
            rows = db.execute(query.order_by(runs.c.created_at, runs.c.id))
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
        allowed = ACTIVE_STATES if from_states is None else frozenset(from_states)
        with self._write() as db:
            current = db.execute(
                sa.select(runs.c.state, runs.c.started_at)
                .where(runs.c.id == run_id)
                .with_for_update()
            ).first()
            if current is None:
                raise RunNotFound(run_id)
            if current.state not in allowed:
                return False
            now = _now()
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
                .values(cancel_requested=True, updated_at=_now())
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
        now = _now()
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
        }
        try:
            with self._write() as db:
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
        except StoreIntegrityError as exc:
            raise StoreIntegrityError(
                f"run {run_id} already has attempt {number}, or submit id {submit_id!r} is "
                f"taken ({exc})"
            ) from exc
        return Attempt(id=int(attempt_id), **values)

    def update_attempt(self, run_id: str, number: int, **fields: Any) -> Attempt:
        """Set attempt fields (machine_id, instance_id, region, state, outcome, exit_code,
        oom_killed, signal, requested_stop, reason, started_at, finished_at); returns the row."""
        _check_fields(fields, ATTEMPT_FIELDS, "an attempt")
        _check_aware(fields)
        outcome = fields.get("outcome")
        if outcome is not None and outcome not in TERMINAL_STATES:
            raise ValueError(f"outcome must be one of {sorted(TERMINAL_STATES)}, not {outcome!r}")
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
        now = _now()
        claimable = sa.or_(
            runs.c.owner.is_(None),
            runs.c.owner_expires_at.is_(None),
            runs.c.owner_expires_at < now,
            runs.c.owner == owner,
        )
        return self._set_owner(run_id, owner, now + timedelta(seconds=ttl_s), claimable)

    def takeover_claim(
        self, run_id: str, expected_owner: str | None, owner: str, ttl_s: float
    ) -> bool:
        """Take the claim from ``expected_owner`` (e.g. a process known to be dead), only if it
        still holds it; False when someone else got there first."""
        current = (
            runs.c.owner.is_(None) if expected_owner is None else runs.c.owner == expected_owner
        )
        return self._set_owner(run_id, owner, _now() + timedelta(seconds=ttl_s), current)

    def _set_owner(
        self, run_id: str, owner: str, expires: datetime, condition: sa.ColumnElement[bool]
    ) -> bool:
        with self._write() as db:
            changed = db.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.state.in_(ACTIVE_STATES), condition)
                .values(owner=owner, owner_expires_at=expires)
            ).rowcount
        return changed == 1

    def renew_claim(self, run_id: str, owner: str, ttl_s: float) -> bool:
        """Extend ``owner``'s claim by ``ttl_s`` from now; False if ``owner`` no longer holds it."""
        expires = _now() + timedelta(seconds=ttl_s)
        with self._write() as db:
            changed = db.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.owner == owner)
                .values(owner_expires_at=expires)
            ).rowcount
        return changed == 1

    def release_claim(self, run_id: str, owner: str) -> None:
        """Give up ``owner``'s claim (no-op if it does not hold it)."""
        with self._write() as db:
            db.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.owner == owner)
                .values(owner=None, owner_expires_at=None)
            )

    # ----- logs -----

    def add_logs(self, run_id: str, attempt_number: int, lines: Iterable[LogLineIn]) -> int:
        """Store lines of an attempt's output; returns how many were new. A line whose entry id
        (given, or derived from its content) is already stored for the attempt is skipped."""
        rows: dict[str, dict[str, Any]] = {}
        for line in lines:
            if line.ts.tzinfo is None:
                raise ValueError(f"log line timestamp must be timezone-aware, got {line.ts!r}")
            key = line.key()
            rows.setdefault(
                key,
                {
                    "run_id": run_id,
                    "attempt_number": attempt_number,
                    "entry_id": key,
                    "ts": line.ts,
                    "stream": line.stream[:16],
                    "message": line.message,
                },
            )
        if not rows:
            return 0
        with self._write() as db:
            return self._insert_new_logs(db, list(rows.values()))

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
