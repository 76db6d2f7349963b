"""Reading the ledger for ``runs list``, ``runs show`` and ``logs`` without the store's imports.

Opening :class:`jobrunner.store.Store` imports SQLModel, pydantic and the SQLAlchemy ORM (its
tables are SQLModel classes), more than half a second before the first row is read. These
commands only read a few rows, so they use plain SQL here: the standard library's ``sqlite3`` for
the SQLite ledger (the default), SQLAlchemy Core for PostgreSQL. The rows come back as the small
frozen records below, with the same attributes as the store's ``Run``, ``Attempt``,
``Transition`` and ``LogLine`` (``jobrunner.cli.render`` takes either).

Writing stays the store's business: when the ledger does not exist yet, or its schema is not the
one this version reads (an older one to migrate, or a newer one to refuse), the store is opened
once to create, migrate or refuse it exactly as every other command does, and reading goes on
from there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, Self

from jobrunner.config import jobrunner_home
from jobrunner.errors import ConfigError, JobrunnerError

__all__ = [
    "AttemptRecord",
    "LedgerReader",
    "LedgerUnavailable",
    "LogRecord",
    "RunIdError",
    "RunRecord",
    "TransitionRecord",
    "check_ledger_location",
    "expected_revision",
]

# As jobrunner.store: ids are 26 Crockford base32 characters; a prefix needs 6 of them.
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_LENGTH = 26
SHORT_ID_LENGTH = 12
MIN_PREFIX_LENGTH = 6
TERMINAL_STATES = frozenset(
    {"succeeded", "failed", "timed_out", "cancelled", "oom_killed", "lost", "create_failed", "dead"}
)
MIGRATIONS = Path(__file__).resolve().parents[1] / "store" / "migrations" / "versions"


class RunIdError(JobrunnerError):
    """A RUN argument that names no run, or more than one (exit 2, as the store's errors)."""


class LedgerUnavailable(JobrunnerError):
    """The ledger could not be read (exit 74)."""


def expected_revision() -> str | None:
    """The newest migration shipped with this version ("0004"), from the scripts' file names."""
    try:
        names = os.listdir(MIGRATIONS)
    except OSError:
        return None
    numbers = [n.split("_", 1)[0] for n in names if n.endswith(".py") and n[:4].isdigit()]
    return max(numbers) if numbers else None


def _utc(value: Any) -> datetime | None:
    if value is None:
        return None
    moment: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:  # SQLite: naive UTC text
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


class _FromMapping:
    _times: frozenset[str] = frozenset()
    _bools: frozenset[str] = frozenset()

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> Self:
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            value = row[f.name]
            if f.name in cls._times:
                value = _utc(value)
            elif f.name in cls._bools:
                value = _bool(value)
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class RunRecord(_FromMapping):
    """A run as ``runs list``/``show`` need it (the store's ``Run`` without the job snapshot)."""

    _times = frozenset(
        {"owner_expires_at", "next_attempt_at", "created_at", "started_at", "finished_at"}
    )
    _bools = frozenset({"cancel_requested"})

    id: str
    job_name: str
    backend: str
    app: str | None
    region: str | None
    state: str
    exit_code: int | None
    reason: str | None
    attempts: int
    max_attempts: int
    trigger: str
    queue: str | None
    cancel_requested: bool
    owner: str | None
    owner_expires_at: datetime | None
    next_attempt_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def short_id(self) -> str:
        return self.id[:SHORT_ID_LENGTH]

    @property
    def is_finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def duration_s(self) -> float | None:
        if self.finished_at is None:
            return None
        start = self.started_at or self.created_at
        return max(0.0, (self.finished_at - start).total_seconds())


@dataclass(frozen=True)
class AttemptRecord(_FromMapping):
    _times = frozenset({"created_at", "started_at", "finished_at"})
    _bools = frozenset({"oom_killed", "requested_stop"})

    id: int
    run_id: str
    number: int
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


@dataclass(frozen=True)
class TransitionRecord(_FromMapping):
    _times = frozenset({"at"})

    id: int
    run_id: str
    attempt_number: int | None
    from_state: str | None
    to_state: str
    reason: str | None
    at: datetime


@dataclass(frozen=True)
class LogRecord(_FromMapping):
    _times = frozenset({"ts"})

    id: int
    run_id: str
    attempt_number: int
    ts: datetime
    stream: str
    message: str


def _columns(record: type[Any]) -> str:
    return ", ".join(f.name for f in fields(record))


class _Database(Protocol):
    def query(self, sql: str, params: Mapping[str, Any]) -> list[Mapping[str, Any]]: ...

    def close(self) -> None: ...


class _Sqlite:
    def __init__(self, path: str) -> None:
        import sqlite3

        self._errors = sqlite3.Error
        try:
            # Read only: never creates the file, never takes a write lock.
            uri = Path(path).absolute().as_uri() + "?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=5.0)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"cannot open the ledger {path}: {exc}") from None
        self._db.row_factory = sqlite3.Row
        self.path = path

    def query(self, sql: str, params: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        try:
            return list(self._db.execute(sql, dict(params)).fetchall())
        except self._errors as exc:
            raise LedgerUnavailable(f"cannot read the ledger {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()


class _Postgres:
    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self._sa = sa
        self._engine = sa.create_engine(url, connect_args={"connect_timeout": 10})
        self.where = _mask(url)

    def query(self, sql: str, params: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        import sqlalchemy.exc

        try:
            with self._engine.connect() as db:
                result = db.execute(self._sa.text(sql), dict(params)).mappings().all()
                return [dict(row) for row in result]
        except sqlalchemy.exc.SQLAlchemyError as exc:
            detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise LedgerUnavailable(
                f"cannot read the ledger at {self.where}: {detail}; is the database running? "
                "(JOBRUNNER_DATABASE_URL)"
            ) from None

    def close(self) -> None:
        self._engine.dispose()


def _mask(url: str) -> str:
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, credentials = head.partition("://")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{tail}" if ":" in credentials else url


def _database_url(environ: Mapping[str, str]) -> str:
    url = environ.get("JOBRUNNER_DATABASE_URL") or ""
    if not url:
        return f"sqlite:///{jobrunner_home(environ) / 'jobrunner.db'}"
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def _sqlite_path(url: str) -> str | None:
    """The file of a plain ``sqlite:///path`` URL; None for anything else (memory, options)."""
    if not url.startswith("sqlite:///") or "?" in url:
        return None
    path = url[len("sqlite:///") :]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return path


def _is_memory(url: str) -> bool:
    return url in ("sqlite://", "sqlite:///", "sqlite:///:memory:") or (
        url.startswith("sqlite:") and "memory" in url
    )


def _nearest_existing(path: Path) -> Path:
    current = path
    while not current.exists() and current.parent != current:
        current = current.parent
    return current


def _unusable_dir(directory: Path) -> str | None:
    """Why ``directory`` cannot hold jobrunner's files (None when it can, or can be made)."""
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_ledger_location(environ: Mapping[str, str] | None = None) -> None:
    """Refuse, as a configuration error (exit 78), a JOBRUNNER_HOME or JOBRUNNER_DATABASE_URL
    that can never work: a home that is a file or not writable, a URL of an unsupported kind.
    A ledger that fails while in use (a database that does not answer) stays an I/O error (74).
    """
    env = os.environ if environ is None else environ
    home = jobrunner_home(env)
    problem = _unusable_dir(home)
    if problem is not None:
        raise ConfigError(
            f"JOBRUNNER_HOME ({home}) cannot be used: {problem}; set JOBRUNNER_HOME to a "
            "directory you can write (default ~/.jobrunner)"
        )
    url = _database_url(env)
    if _is_memory(url):
        return
    if not url.startswith(("sqlite:", "postgresql+psycopg://")):
        raise ConfigError(
            f"JOBRUNNER_DATABASE_URL={_mask(url)!r} is not a database jobrunner can use; "
            "use sqlite:///path/to/file.db or postgresql://user:password@host:5432/dbname"
        )
    path = _sqlite_path(url)
    if path is None:
        return
    ledger = Path(path)
    if ledger.exists():
        if not ledger.is_file():
            raise ConfigError(
                f"the ledger {ledger} is not a file; set JOBRUNNER_DATABASE_URL "
                "(or JOBRUNNER_HOME) to a writable place"
            )
        return
    problem = _unusable_dir(ledger.parent)
    if problem is not None:
        raise ConfigError(
            f"cannot create the ledger {ledger}: {problem}; set JOBRUNNER_DATABASE_URL "
            "(or JOBRUNNER_HOME) to a writable place"
        )


def _open_with_store(url: str) -> None:
    """Create, migrate or refuse the ledger as every other command does (imports the store)."""
    from jobrunner.store import Store

    Store(url).close()


class LedgerReader:
    """Read-only queries over the ledger named by the environment (see the module docstring)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        check_ledger_location(env)
        url = _database_url(env)
        self._db: _Database | None = None
        if _is_memory(url):
            return  # a fresh in-memory ledger: nothing was ever recorded in it
        path = _sqlite_path(url)
        if path is None and not url.startswith("postgresql+psycopg://"):
            _open_with_store(url)  # an SQLite URL with options, or a bad URL: the store's error
            raise LedgerUnavailable(f"cannot read the ledger {url!r} without the store")
        if path is not None and not Path(path).exists():
            _open_with_store(url)
        self._db = _Sqlite(path) if path is not None else _Postgres(url)
        if self._revision() != expected_revision():
            self._db.close()
            _open_with_store(url)  # migrates it, or refuses a newer one (MigrationError)
            self._db = _Sqlite(path) if path is not None else _Postgres(url)

    def _revision(self) -> str | None:
        assert self._db is not None
        try:
            rows = self._db.query("SELECT version_num FROM alembic_version", {})
        except LedgerUnavailable:
            return None
        return str(rows[0]["version_num"]) if rows else None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _query(self, sql: str, **params: Any) -> list[Mapping[str, Any]]:
        if self._db is None:
            return []
        return self._db.query(sql, params)

    def list_runs(
        self,
        *,
        job: str | None = None,
        states: Sequence[str] = (),
        app: str | None = None,
        backend: str | None = None,
        limit: int = 50,
    ) -> list[RunRecord]:
        """Runs, newest first, filtered by job, state(s), app and backend."""
        where: list[str] = []
        params: dict[str, Any] = {"limit": limit}
        for column, value in (("job_name", job), ("app", app), ("backend", backend)):
            if value is not None:
                where.append(f"{column} = :{column}")
                params[column] = value
        if states:
            names = [f"state{i}" for i in range(len(states))]
            where.append(f"state IN ({', '.join(':' + n for n in names)})")
            params.update(zip(names, states, strict=True))
        sql = f"SELECT {_columns(RunRecord)} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT :limit"
        return [RunRecord.from_mapping(r) for r in self._query(sql, **params)]

    def get_run(self, run_id_or_prefix: str) -> RunRecord:
        """The run with this id or unique prefix (at least 6 characters, any case)."""
        prefix = run_id_or_prefix.strip().upper()
        if not prefix or any(c not in ALPHABET for c in prefix):
            raise _not_found(run_id_or_prefix)
        if len(prefix) < MIN_PREFIX_LENGTH:
            raise RunIdError(
                f"run id prefix {run_id_or_prefix!r} is too short: give at least "
                f"{MIN_PREFIX_LENGTH} characters (see `jobrunner runs list`)"
            )
        columns = _columns(RunRecord)
        if len(prefix) >= ID_LENGTH:
            rows = self._query(f"SELECT {columns} FROM runs WHERE id = :id", id=prefix)
        else:
            # A range on the primary key (an index search, as the store does it).
            sql = f"SELECT {columns} FROM runs WHERE id >= :low"
            params: dict[str, Any] = {"low": prefix}
            upper = _upper_bound(prefix)
            if upper is not None:
                sql += " AND id < :high"
                params["high"] = upper
            rows = self._query(sql + " ORDER BY id LIMIT 6", **params)
        if not rows:
            raise _not_found(run_id_or_prefix)
        if len(rows) > 1:
            ids = [str(r["id"]) for r in rows]
            shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
            raise RunIdError(
                f"run id prefix {run_id_or_prefix!r} matches more than one run ({shown}); "
                "type more characters"
            )
        return RunRecord.from_mapping(rows[0])

    def attempts(self, run_ids: Sequence[str]) -> dict[str, list[AttemptRecord]]:
        """Each run's attempts in order (one query for all of them)."""
        found: dict[str, list[AttemptRecord]] = {run_id: [] for run_id in run_ids}
        if not run_ids:
            return found
        names = [f"r{i}" for i in range(len(run_ids))]
        sql = (
            f"SELECT {_columns(AttemptRecord)} FROM attempts "
            f"WHERE run_id IN ({', '.join(':' + n for n in names)}) ORDER BY run_id, number"
        )
        for row in self._query(sql, **dict(zip(names, run_ids, strict=True))):
            attempt = AttemptRecord.from_mapping(row)
            found[attempt.run_id].append(attempt)
        return found

    def transitions(self, run_id: str) -> list[TransitionRecord]:
        sql = (
            f"SELECT {_columns(TransitionRecord)} FROM run_transitions "
            "WHERE run_id = :run_id ORDER BY id"
        )
        return [TransitionRecord.from_mapping(r) for r in self._query(sql, run_id=run_id)]

    def logs(self, run_id: str, *, after_id: int = 0) -> list[LogRecord]:
        sql = (
            f"SELECT {_columns(LogRecord)} FROM log_lines "
            "WHERE run_id = :run_id AND id > :after ORDER BY id"
        )
        return [LogRecord.from_mapping(r) for r in self._query(sql, run_id=run_id, after=after_id)]


def _not_found(run_id: str) -> RunIdError:
    return RunIdError(
        f"no run with id {run_id!r}; see `jobrunner runs list` for the ids of recent runs"
    )


def _upper_bound(prefix: str) -> str | None:
    chars = list(prefix)
    while chars:
        position = ALPHABET.index(chars[-1])
        if position + 1 < len(ALPHABET):
            chars[-1] = ALPHABET[position + 1]
            return "".join(chars)
        chars.pop()
    return None


@contextmanager
def reading(environ: Mapping[str, str] | None = None) -> Iterator[LedgerReader]:
    reader = LedgerReader(environ)
    try:
        yield reader
    finally:
        reader.close()
