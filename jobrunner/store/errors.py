"""Errors of the run ledger.

JobrunnerError
└── StoreError                     anything the store cannot do (database named, password masked)
    ├── StoreConnectionError       the database cannot be reached or opened
    ├── StoreBusy                  SQLite stayed locked by another process past busy_timeout
    ├── StoreIntegrityError        a write broke a constraint (e.g. a duplicate attempt number)
    ├── MigrationError             the schema cannot be brought to this version's head
    ├── RunNotFound                no run has that id (or id prefix)
    ├── AmbiguousRunId             an id prefix matches more than one run
    ├── InvalidRunId               an id prefix too short or with characters ids never have
    └── AttemptNotFound            the run has no attempt with that number
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jobrunner.errors import JobrunnerError

__all__ = [
    "AmbiguousRunId",
    "AttemptNotFound",
    "BlobNotFound",
    "InvalidRunId",
    "MigrationError",
    "RunNotFound",
    "StoreBusy",
    "StoreConnectionError",
    "StoreError",
    "StoreIntegrityError",
    "is_sqlite_busy",
]


class StoreError(JobrunnerError):
    """The run ledger could not do what was asked. Messages never contain a password."""


class StoreConnectionError(StoreError):
    """The database cannot be reached or opened."""


class StoreBusy(StoreError):
    """SQLite stayed locked by another writer for longer than the busy timeout."""


class StoreIntegrityError(StoreError):
    """A write broke a uniqueness or foreign-key rule."""


class MigrationError(StoreError):
    """The database schema cannot be migrated to the version this jobrunner needs."""


class RunNotFound(StoreError):
    """No run matches the id or prefix."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(
            f"no run with id {run_id!r}; see `jobrunner runs list` for the ids of recent runs"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.run_id,))


class AmbiguousRunId(StoreError):
    """An id prefix matches several runs."""

    def __init__(self, prefix: str, matches: Sequence[str]) -> None:
        self.prefix = prefix
        self.matches = list(matches)
        shown = ", ".join(self.matches[:5]) + (", ..." if len(self.matches) > 5 else "")
        super().__init__(
            f"run id prefix {prefix!r} matches more than one run ({shown}); type more characters"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.prefix, self.matches))


class InvalidRunId(StoreError):
    """An id prefix that cannot identify a run."""


class AttemptNotFound(StoreError):
    """The run has no attempt with that number."""

    def __init__(self, run_id: str, number: int) -> None:
        self.run_id = run_id
        self.number = number
        super().__init__(
            f"run {run_id} has no attempt {number}; see `jobrunner runs show {run_id}`"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.run_id, self.number))


class BlobNotFound(StoreError):
    """The blob store holds no bytes with this sha256."""

    def __init__(self, sha256: str) -> None:
        self.sha256 = sha256
        super().__init__(f"the ledger holds no file contents with sha256 {sha256}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.sha256,))


def is_sqlite_busy(message: str) -> bool:
    """Whether an SQLite error message says another connection holds the database's lock."""
    text = message.lower()
    return "locked" in text or "busy" in text
