"""Database URLs, engines and the mapping of driver errors to :class:`StoreError`.

SQLite (the default, one file under ``$JOBRUNNER_HOME``) is made safe for several processes: WAL
journal, ``busy_timeout`` 5000 ms, foreign keys on, and every write transaction opened with
``BEGIN IMMEDIATE`` so that two writers queue up instead of failing halfway through (a deferred
transaction that reads and then writes can hit SQLITE_BUSY without waiting). Reads use a plain
``BEGIN`` and never block writers.

PostgreSQL URLs (``postgresql://`` or ``postgres://``) are normalised to the psycopg 3 driver.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool

from jobrunner.config import create_private_file, jobrunner_home, make_private_dir
from jobrunner.store.errors import (
    StoreBusy,
    StoreConnectionError,
    StoreError,
    StoreIntegrityError,
    is_sqlite_busy,
)

__all__ = [
    "READ_OPTION",
    "create_store_engine",
    "default_url",
    "is_in_memory_url",
    "mask_url",
    "normalise_url",
    "resolve_url",
    "translate_errors",
]

SQLITE_BUSY_TIMEOUT_MS = 5000
# PostgreSQL connections kept open: the ledger's store threads (8) plus the event loop's own.
POOL_SIZE = 10
DB_FILE_NAME = "jobrunner.db"
# Execution option marking a connection that only reads (SQLite then opens a deferred transaction).
READ_OPTION = "jobrunner_read_only"
_PASSWORD_IN_URL = re.compile(r"(://[^:/@]*:)[^@]*(@)")


def default_url(environ: Mapping[str, str] | None = None) -> str:
    """``sqlite:///$JOBRUNNER_HOME/jobrunner.db`` (``JOBRUNNER_HOME`` defaults to ~/.jobrunner)."""
    return f"sqlite:///{jobrunner_home(environ) / DB_FILE_NAME}"


def resolve_url(url: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The URL to use: ``url``, else ``$JOBRUNNER_DATABASE_URL``, else :func:`default_url`."""
    env = os.environ if environ is None else environ
    return normalise_url(url or env.get("JOBRUNNER_DATABASE_URL") or default_url(env))


def normalise_url(url: str) -> str:
    """Point ``postgresql://`` and ``postgres://`` URLs at the psycopg 3 driver."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe for logs, errors and repr)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return _PASSWORD_IN_URL.sub(r"\1***\2", url)


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except sa_exc.ArgumentError:
        raise StoreError(
            f"invalid database URL {mask_url(url)!r}: use sqlite:///path/to/file.db or "
            "postgresql://user:password@host:5432/dbname (JOBRUNNER_DATABASE_URL)"
        ) from None


def create_store_engine(url: str) -> Engine:
    """An engine for ``url`` set up as the module docstring describes."""
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed)
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            raise StoreError(
                f"unsupported PostgreSQL driver in {mask_url(url)!r}: use postgresql://... "
                "(jobrunner uses psycopg 3)"
            )
        # A pool as large as the ledger's thread pool (store/ledger.py): a smaller one makes
        # every burst open and close overflow connections (66 in 38 s in the worker benchmark).
        return sa.create_engine(
            parsed,
            pool_pre_ping=True,
            pool_size=POOL_SIZE,
            max_overflow=POOL_SIZE,
            connect_args={"connect_timeout": 10},
        )
    raise StoreError(
        f"unsupported database {backend!r} in {mask_url(url)!r}: use sqlite:///... or "
        "postgresql://... (JOBRUNNER_DATABASE_URL)"
    )


def _is_memory_database(database: str) -> bool:
    return (
        database in ("", ":memory:")
        or database.startswith("file::memory:")
        or (database.startswith("file:") and "mode=memory" in database)
    )


def is_in_memory_url(url: str) -> bool:
    """Whether ``url`` names an SQLite database that lives in one process's memory only."""
    try:
        parsed = make_url(normalise_url(url))
    except sa_exc.ArgumentError:
        return False
    return parsed.get_backend_name() == "sqlite" and _is_memory_database(parsed.database or "")


def _sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if in_memory:
        # One shared connection, or every pooled connection would see its own empty database.
        engine = sa.create_engine(
            url, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        # Only its owner may read the ledger (job snapshots, log lines): a folder and a file
        # jobrunner creates are 0700 and 0600; SQLite gives its -wal and -shm files the
        # database file's mode.
        db_path = Path(database).expanduser()
        try:
            make_private_dir(db_path.parent)
        except OSError as exc:
            raise StoreConnectionError(
                f"cannot create the folder for the SQLite database {database!r}: {exc.strerror}; "
                "set JOBRUNNER_HOME or JOBRUNNER_DATABASE_URL to a writable place"
            ) from None
        if not database.startswith("file:"):
            # On failure SQLite itself reports what is wrong, with the same advice.
            with contextlib.suppress(OSError):
                create_private_file(db_path)
        engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module; _on_begin issues BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        if not in_memory:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        read_only = connection.get_execution_options().get(READ_OPTION, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


@contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Re-raise SQLAlchemy and driver errors as :class:`StoreError` subclasses, password masked."""
    try:
        yield
    except sa_exc.SQLAlchemyError as exc:
        raise map_error(exc, url) from exc


def map_error(exc: sa_exc.SQLAlchemyError, url: str) -> StoreError:
    """The :class:`StoreError` for a SQLAlchemy/driver exception raised while using ``url``."""
    parsed = make_url(url)
    where = mask_url(url)
    detail = _detail(exc, parsed)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if isinstance(exc, sa_exc.IntegrityError):
        return StoreIntegrityError(f"the database refused a write: {detail}")
    if isinstance(exc, sa_exc.OperationalError) and is_sqlite:
        if is_sqlite_busy(detail):
            return StoreBusy(
                f"the SQLite database {parsed.database!r} stayed locked by another process for "
                f"more than {SQLITE_BUSY_TIMEOUT_MS // 1000}s ({detail}); retry, or use "
                "PostgreSQL (JOBRUNNER_DATABASE_URL) for many concurrent writers"
            )
        if "unable to open" in detail or "readonly" in detail or "read-only" in detail:
            return StoreConnectionError(
                f"cannot open the SQLite database {parsed.database!r}: {detail}; check the path "
                "and its permissions, or set JOBRUNNER_HOME / JOBRUNNER_DATABASE_URL"
            )
    if isinstance(exc, sa_exc.OperationalError) and not is_sqlite and _is_connect_failure(exc):
        host = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
        if "does not exist" in detail:
            hint = f"create it (createdb {parsed.database}) or fix JOBRUNNER_DATABASE_URL"
        elif "authentication" in detail or "password" in detail:
            hint = "check the user and password in JOBRUNNER_DATABASE_URL"
        else:
            hint = "is it running? set JOBRUNNER_DATABASE_URL to the right server"
        return StoreConnectionError(
            f"cannot connect to PostgreSQL at {host} (database {parsed.database!r}): {detail}; "
            f"{hint}"
        )
    if isinstance(exc, sa_exc.DBAPIError):
        return StoreError(f"database error on {where}: {detail}")
    return StoreError(f"database error on {where}: {type(exc).__name__}: {detail}")


def _is_connect_failure(exc: sa_exc.OperationalError) -> bool:
    # Errors raised while connecting carry no statement.
    return exc.statement is None or exc.connection_invalidated


def _detail(exc: sa_exc.SQLAlchemyError, url: URL) -> str:
    """The driver's own message, first line only, never containing the password."""
    original = getattr(exc, "orig", None)
    text = str(original if original is not None else exc).strip().splitlines()
    detail = text[0] if text else type(exc).__name__
    if url.password:
        detail = detail.replace(str(url.password), "***")
    return detail
