"""The ledger's tables (SQLModel), on their own MetaData so other SQLModel users do not mix in.

Timestamps are stored as UTC and always come back timezone-aware, also from SQLite, which has no
time zones (it stores ``YYYY-MM-DD HH:MM:SS.ffffff`` text that sorts in time order).

The migration in ``migrations/versions`` must create exactly these tables; a test compares them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

__all__ = [
    "METADATA",
    "AttemptRow",
    "BlobRow",
    "LogLineRow",
    "RateBucketRow",
    "RunBlobRow",
    "RunRow",
    "ScheduleFireRow",
    "ScheduleRow",
    "StoreModel",
    "TransitionRow",
    "UTCDateTime",
]

# Deterministic constraint names, so later migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
METADATA = sa.MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database (naive UTC text on SQLite)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _id_type() -> sa.types.TypeEngine[Any]:
    # SQLite only auto-increments an INTEGER PRIMARY KEY (a BIGINT key would never be filled in).
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(*, nullable: bool = True) -> Any:
    return Field(default=None, sa_column=sa.Column(UTCDateTime(), nullable=nullable))


class StoreModel(SQLModel):
    """Base of the ledger tables; owns the ledger's MetaData."""

    metadata = METADATA


class RunRow(StoreModel, table=True):
    """One run of a job: the ledger's main row."""

    __tablename__ = "runs"
    __table_args__ = (
        sa.Index("ix_runs_state", "state"),
        sa.Index("ix_runs_job_name_created_at", "job_name", "created_at"),
        sa.Index("ix_runs_created_at", "created_at"),
        # Workers claim the next due run of their queues in priority order through this index.
        sa.Index("ix_runs_state_queue_priority", "state", "queue", "priority"),
        sa.Index("ix_runs_idempotency_key", "idempotency_key"),
        sa.Index("ix_runs_owner", "owner"),
    )

    id: str = Field(sa_column=sa.Column(sa.String(26), primary_key=True))
    job_name: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    job_snapshot: dict[str, Any] = Field(sa_column=sa.Column(sa.JSON(), nullable=False))
    backend: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    app: str | None = Field(default=None, sa_column=sa.Column(sa.String(100), nullable=True))
    region: str | None = Field(default=None, sa_column=sa.Column(sa.String(32), nullable=True))
    state: str = Field(sa_column=sa.Column(sa.String(20), nullable=False))
    exit_code: int | None = Field(default=None, sa_column=sa.Column(sa.Integer(), nullable=True))
    reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    attempts: int = Field(default=0, sa_column=sa.Column(sa.Integer(), nullable=False))
    max_attempts: int = Field(sa_column=sa.Column(sa.Integer(), nullable=False))
    timeout_s: float | None = Field(default=None, sa_column=sa.Column(sa.Float(), nullable=True))
    trigger: str = Field(sa_column=sa.Column(sa.String(32), nullable=False))
    # Set for enqueued runs only: workers claim those; a run without a queue is driven by the
    # process that submitted it (and adopted by anyone if that process dies).
    queue: str | None = Field(default=None, sa_column=sa.Column(sa.String(64), nullable=True))
    priority: int = Field(
        default=0, sa_column=sa.Column(sa.Integer(), nullable=False, server_default="0")
    )
    idempotency_key: str | None = Field(
        default=None, sa_column=sa.Column(sa.String(255), nullable=True)
    )
    cancel_requested: bool = Field(default=False, sa_column=sa.Column(sa.Boolean(), nullable=False))
    owner: str | None = Field(default=None, sa_column=sa.Column(sa.String(255), nullable=True))
    owner_expires_at: datetime | None = _ts()
    next_attempt_at: datetime | None = _ts()
    created_at: datetime = _ts(nullable=False)
    started_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    updated_at: datetime = _ts(nullable=False)


class AttemptRow(StoreModel, table=True):
    """One attempt of a run: one machine (or one failed try to create it)."""

    __tablename__ = "attempts"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "number"),
        sa.UniqueConstraint("submit_id"),
        sa.Index("ix_attempts_machine_id", "machine_id"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(_id_type(), primary_key=True))
    run_id: str = Field(
        sa_column=sa.Column(
            sa.String(26), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        )
    )
    number: int = Field(sa_column=sa.Column(sa.Integer(), nullable=False))
    submit_id: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    machine_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(64), nullable=True))
    instance_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(64), nullable=True))
    region: str | None = Field(default=None, sa_column=sa.Column(sa.String(32), nullable=True))
    state: str = Field(sa_column=sa.Column(sa.String(20), nullable=False))
    outcome: str | None = Field(default=None, sa_column=sa.Column(sa.String(20), nullable=True))
    exit_code: int | None = Field(default=None, sa_column=sa.Column(sa.Integer(), nullable=True))
    oom_killed: bool | None = Field(default=None, sa_column=sa.Column(sa.Boolean(), nullable=True))
    signal: int | None = Field(default=None, sa_column=sa.Column(sa.Integer(), nullable=True))
    requested_stop: bool | None = Field(
        default=None, sa_column=sa.Column(sa.Boolean(), nullable=True)
    )
    reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    created_at: datetime = _ts(nullable=False)
    started_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    # When the machine's last log lines were known to be copied (after the drain that follows
    # its exit). A finished attempt without it lost its driver in between: anyone may copy them.
    logs_copied_at: datetime | None = _ts()


class TransitionRow(StoreModel, table=True):
    """One change of a run's state, written in the same transaction as the change."""

    __tablename__ = "run_transitions"
    __table_args__ = (sa.Index("ix_run_transitions_run_id_id", "run_id", "id"),)

    id: int | None = Field(default=None, sa_column=sa.Column(_id_type(), primary_key=True))
    run_id: str = Field(
        sa_column=sa.Column(
            sa.String(26), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        )
    )
    attempt_number: int | None = Field(
        default=None, sa_column=sa.Column(sa.Integer(), nullable=True)
    )
    from_state: str | None = Field(default=None, sa_column=sa.Column(sa.String(20), nullable=True))
    to_state: str = Field(sa_column=sa.Column(sa.String(20), nullable=False))
    reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    at: datetime = _ts(nullable=False)


class LogLineRow(StoreModel, table=True):
    """One line of a run's output; ``entry_id`` makes re-fetched lines collapse into one."""

    __tablename__ = "log_lines"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "attempt_number", "entry_id"),
        sa.Index("ix_log_lines_run_id_id", "run_id", "id"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(_id_type(), primary_key=True))
    run_id: str = Field(
        sa_column=sa.Column(
            sa.String(26), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        )
    )
    attempt_number: int = Field(sa_column=sa.Column(sa.Integer(), nullable=False))
    entry_id: str = Field(sa_column=sa.Column(sa.String(128), nullable=False))
    ts: datetime = _ts(nullable=False)
    stream: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    message: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))


class RateBucketRow(StoreModel, table=True):
    """A token bucket of the Machines API's rate limits, shared by every process on the ledger:
    ``tokens`` may go below zero, each negative token being a call already waiting its turn."""

    __tablename__ = "rate_buckets"

    key: str = Field(sa_column=sa.Column(sa.String(200), primary_key=True))
    tokens: float = Field(sa_column=sa.Column(sa.Float(), nullable=False))
    updated_at: datetime = _ts(nullable=False)


class ScheduleRow(StoreModel, table=True):
    """What the ledger knows of a cron schedule beyond its job file: until when its ticks have
    been decided (so downtime is noticed and caught up), and whether a user paused it."""

    __tablename__ = "schedules"

    name: str = Field(sa_column=sa.Column(sa.String(100), primary_key=True))
    decided_until: datetime = _ts(nullable=False)
    paused: bool = Field(default=False, sa_column=sa.Column(sa.Boolean(), nullable=False))
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)


class ScheduleFireRow(StoreModel, table=True):
    """One decision about one tick of a schedule: fired (with its run) or skipped (with why).

    Unique on (schedule, scheduled_for): whichever scheduler inserts the row decides the tick,
    so several schedulers sharing the ledger fire each tick exactly once."""

    __tablename__ = "schedule_fires"
    __table_args__ = (
        sa.UniqueConstraint("schedule", "scheduled_for"),
        sa.Index("ix_schedule_fires_schedule_id", "schedule", "id"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(_id_type(), primary_key=True))
    schedule: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    scheduled_for: datetime = _ts(nullable=False)
    decision: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    trigger: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    run_id: str | None = Field(
        default=None,
        sa_column=sa.Column(
            sa.String(26), sa.ForeignKey("runs.id", ondelete="SET NULL"), nullable=True
        ),
    )
    decided_at: datetime = _ts(nullable=False)


class BlobRow(StoreModel, table=True):
    """The bytes of a job's file, stored once however many runs use them (content-addressed:
    the key is the sha256 of ``data``). Run snapshots refer to them by digest."""

    __tablename__ = "blobs"

    sha256: str = Field(sa_column=sa.Column(sa.String(64), primary_key=True))
    size: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))
    data: bytes = Field(sa_column=sa.Column(sa.LargeBinary(), nullable=False))
    created_at: datetime = _ts(nullable=False)


class RunBlobRow(StoreModel, table=True):
    """Which run refers to which blob: pruning runs removes blobs no run refers to any more."""

    __tablename__ = "run_blobs"
    __table_args__ = (sa.Index("ix_run_blobs_sha256", "sha256"),)

    run_id: str = Field(
        sa_column=sa.Column(
            sa.String(26),
            sa.ForeignKey("runs.id", ondelete="CASCADE"),
            primary_key=True,
        )
    )
    sha256: str = Field(sa_column=sa.Column(sa.String(64), primary_key=True))
