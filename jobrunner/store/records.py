"""What the store returns: frozen snapshots of rows, safe to keep after the session is gone."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Self

from jobrunner.states import TERMINAL_STATES
from jobrunner.store.ids import SHORT_ID_LENGTH

__all__ = ["Attempt", "Fire", "LogLine", "LogLineIn", "Run", "ScheduleState", "Transition"]


class _FromRow:
    @classmethod
    def from_row(cls, row: Any) -> Self:
        """Copy the matching attributes of a table row (or any object with them)."""
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Run(_FromRow):
    """One run of a job, as recorded."""

    id: str
    job_name: str
    job_snapshot: dict[str, Any]
    backend: str
    app: str | None
    region: str | None
    state: str
    exit_code: int | None
    reason: str | None
    attempts: int
    max_attempts: int
    timeout_s: float | None
    trigger: str
    queue: str | None
    priority: int
    idempotency_key: str | None
    cancel_requested: bool
    owner: str | None
    owner_expires_at: datetime | None
    next_attempt_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @property
    def short_id(self) -> str:
        """The first 12 characters: the creation millisecond plus two random characters."""
        return self.id[:SHORT_ID_LENGTH]

    @property
    def is_finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def duration_s(self) -> float | None:
        """Seconds from start (or creation, if it never started) to finish; None until finished."""
        if self.finished_at is None:
            return None
        start = self.started_at or self.created_at
        return max(0.0, (self.finished_at - start).total_seconds())


@dataclass(frozen=True)
class Attempt(_FromRow):
    """One attempt of a run (one machine, or one failed try to create it)."""

    id: int
    run_id: str
    number: int
    submit_id: str
    machine_id: str | None
    instance_id: str | None
    region: str | None
    state: str
    outcome: str | None
    exit_code: int | None
    oom_killed: bool | None
    signal: int | None
    requested_stop: bool | None
    reason: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    logs_copied_at: datetime | None = None


@dataclass(frozen=True)
class Transition(_FromRow):
    """One recorded change of a run's state."""

    id: int
    run_id: str
    attempt_number: int | None
    from_state: str | None
    to_state: str
    reason: str | None
    at: datetime


@dataclass(frozen=True)
class LogLine(_FromRow):
    """One stored line of output."""

    id: int
    run_id: str
    attempt_number: int
    entry_id: str
    ts: datetime
    stream: str
    message: str


@dataclass(frozen=True)
class LogLineIn:
    """A line to store. Without ``entry_id`` (the logs API's id), one is derived from the line's
    timestamp, stream and text, so fetching the same line twice still stores it once."""

    ts: datetime
    message: str
    stream: str = "stdout"
    entry_id: str | None = None

    def key(self) -> str:
        if self.entry_id:
            return self.entry_id[:128]
        digest = hashlib.sha256(f"{self.ts.isoformat()}\0{self.stream}\0{self.message}".encode())
        return "h:" + digest.hexdigest()[:40]


@dataclass(frozen=True)
class ScheduleState(_FromRow):
    """A cron schedule's state in the ledger: ticks up to ``decided_until`` are decided."""

    name: str
    decided_until: datetime
    paused: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Fire(_FromRow):
    """One decision about one tick of a schedule."""

    id: int
    schedule: str
    scheduled_for: datetime
    decision: str  # "fired" or "skipped"
    reason: str | None
    trigger: str  # "cron" (a tick), "catch_up" (a missed tick fired late), "manual"
    run_id: str | None
    decided_at: datetime
