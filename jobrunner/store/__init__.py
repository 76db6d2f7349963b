"""The run ledger: runs, attempts, state transitions and log lines, in SQLite or PostgreSQL.

    from jobrunner.store import Store
    store = Store()                      # $JOBRUNNER_DATABASE_URL or ~/.jobrunner/jobrunner.db
    run = store.create_run(job_name="hello", job_snapshot=job.snapshot(), backend="local",
                           app="jobrunner-local", region=None, max_attempts=1, timeout_s=None)

Tables are SQLModel models (:mod:`.tables`), migrated with Alembic on open (:mod:`.migrate`);
every statement lives in :mod:`.store`.
"""

from __future__ import annotations

from jobrunner.states import ACTIVE_STATES, RUN_STATES, TERMINAL_STATES
from jobrunner.store.engine import default_url, mask_url, normalise_url, resolve_url
from jobrunner.store.errors import (
    AmbiguousRunId,
    AttemptNotFound,
    BlobNotFound,
    InvalidRunId,
    MigrationError,
    RunNotFound,
    StoreBusy,
    StoreConnectionError,
    StoreError,
    StoreIntegrityError,
)
from jobrunner.store.ledger import Ledger, SqlLedger
from jobrunner.store.records import (
    Attempt,
    Fire,
    LogLine,
    LogLineIn,
    Run,
    ScheduleState,
    Transition,
)
from jobrunner.store.store import (
    MIN_PREFIX_LENGTH,
    FireDecision,
    PreparedFires,
    RunRequest,
    Store,
)

__all__ = [
    "ACTIVE_STATES",
    "MIN_PREFIX_LENGTH",
    "RUN_STATES",
    "TERMINAL_STATES",
    "AmbiguousRunId",
    "Attempt",
    "AttemptNotFound",
    "BlobNotFound",
    "Fire",
    "FireDecision",
    "InvalidRunId",
    "Ledger",
    "LogLine",
    "LogLineIn",
    "MigrationError",
    "PreparedFires",
    "Run",
    "RunNotFound",
    "RunRequest",
    "ScheduleState",
    "SqlLedger",
    "Store",
    "StoreBusy",
    "StoreConnectionError",
    "StoreError",
    "StoreIntegrityError",
    "Transition",
    "default_url",
    "mask_url",
    "normalise_url",
    "resolve_url",
]
