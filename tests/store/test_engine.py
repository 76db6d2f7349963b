"""Database URLs, SQLite settings, and driver errors turned into clear StoreErrors."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import sqlalchemy.exc as sa_exc

from jobrunner.store import (
    Store,
    StoreBusy,
    StoreConnectionError,
    StoreError,
    StoreIntegrityError,
    default_url,
    mask_url,
    normalise_url,
)
from jobrunner.store.engine import map_error

PASSWORD = "s3cret-Pa55"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_postgres_urls_use_the_psycopg_driver() -> None:
    assert normalise_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalise_url("postgres://u@h:5433/db") == "postgresql+psycopg://u@h:5433/db"
    assert normalise_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"


def test_mask_url_hides_only_the_password() -> None:
    masked = mask_url(f"postgresql+psycopg://jobs:{PASSWORD}@db.internal:5432/ledger")
    assert PASSWORD not in masked
    assert masked == "postgresql+psycopg://jobs:***@db.internal:5432/ledger"
    assert PASSWORD not in mask_url(f"weird scheme://jobs:{PASSWORD}@host/db")


def test_default_database_lives_in_jobrunner_home(isolated_environment: Path) -> None:
    assert default_url() == f"sqlite:///{isolated_environment / 'jobrunner.db'}"
    assert not isolated_environment.exists()

    with Store() as store:
        store.create_run(
            job_name="hello",
            job_snapshot={},
            backend="local",
            app=None,
            region=None,
            max_attempts=1,
            timeout_s=None,
        )
        assert store.dialect == "sqlite"

    assert (isolated_environment / "jobrunner.db").is_file()


def test_from_env_uses_jobrunner_database_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_environment: Path
) -> None:
    monkeypatch.setenv("JOBRUNNER_DATABASE_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")

    with Store.from_env() as store:
        assert store.url == f"sqlite:///{tmp_path / 'elsewhere.db'}"

    assert (tmp_path / "elsewhere.db").is_file()
    assert not (isolated_environment / "jobrunner.db").exists()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_password_is_masked_in_repr_and_url(database_url: str) -> None:
    # The test server trusts local connections, so any password is accepted.
    with_password = database_url.replace("postgres@", f"postgres:{PASSWORD}@")
    with Store(with_password) as store:
        assert PASSWORD not in repr(store) and PASSWORD not in store.url
        assert "postgres:***@127.0.0.1:5432" in repr(store)


def test_unreachable_postgres_gives_a_clear_error_without_the_password() -> None:
    port = _free_port()
    with pytest.raises(StoreConnectionError) as caught:
        Store(f"postgresql://jobs:{PASSWORD}@127.0.0.1:{port}/ledger")
    message = str(caught.value)
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}" in message
    assert "is it running?" in message and "JOBRUNNER_DATABASE_URL" in message
    assert PASSWORD not in message


def test_unsupported_or_malformed_urls(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="unsupported database 'mysql'"):
        Store(f"mysql://root:{PASSWORD}@localhost/db")
    with pytest.raises(StoreError, match="invalid database URL"):
        Store("definitely not a url")


def test_sqlite_folder_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreConnectionError, match="cannot create the folder"):
        Store(f"sqlite:///{blocker / 'sub' / 'jobrunner.db'}")


def test_sqlite_is_set_up_for_several_processes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Store(f"sqlite:///{path}") as store:
        engine = store._engine  # the settings are per connection, so look at a pooled one
        with engine.connect() as connection:
            pragma = connection.exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA busy_timeout").scalar() == 5000
            assert pragma("PRAGMA foreign_keys").scalar() == 1


def test_sqlite_reads_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Store(f"sqlite:///{path}") as store:
        run = store.create_run(
            job_name="hello",
            job_snapshot={},
            backend="local",
            app=None,
            region=None,
            max_attempts=1,
            timeout_s=None,
        )
        writer = sqlite3.connect(path, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
            started = time.monotonic()
            assert store.get_run(run.id).id == run.id
            assert store.list_runs()[0].id == run.id
            assert time.monotonic() - started < 1.0
        finally:
            writer.execute("ROLLBACK")
            writer.close()


DBAPI_ERRORS = sorted(
    {
        sa_exc.DBAPIError,
        *(
            c
            for c in sa_exc.__dict__.values()
            if isinstance(c, type) and issubclass(c, sa_exc.DBAPIError)
        ),
    },
    key=lambda c: c.__name__,
)


@pytest.mark.parametrize("error_class", DBAPI_ERRORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("url", ["sqlite:///x.db", f"postgresql+psycopg://u:{PASSWORD}@h/db"])
def test_every_driver_error_becomes_a_store_error(
    error_class: type[sa_exc.DBAPIError], url: str
) -> None:
    # The driver's message repeats the URL's password (when it has one); it must not get through.
    detail = f"boom (password {PASSWORD})" if PASSWORD in url else "boom"
    error = error_class("SELECT 1", {}, Exception(detail))
    mapped = map_error(error, url)
    assert isinstance(mapped, StoreError)
    assert PASSWORD not in str(mapped)
    assert "boom" in str(mapped)


def test_specific_errors_map_to_specific_classes() -> None:
    locked = sa_exc.OperationalError(
        "UPDATE runs", {}, sqlite3.OperationalError("database is locked")
    )
    assert isinstance(map_error(locked, "sqlite:///x.db"), StoreBusy)
    duplicate = sa_exc.IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed"))
    assert isinstance(map_error(duplicate, "sqlite:///x.db"), StoreIntegrityError)
    connect = sa_exc.OperationalError(None, None, Exception("connection refused"))
    mapped = map_error(connect, f"postgresql+psycopg://u:{PASSWORD}@db:6543/x")
    assert isinstance(mapped, StoreConnectionError) and "db:6543" in str(mapped)
    other = map_error(sa_exc.NoSuchTableError("runs"), "sqlite:///x.db")
    assert type(other) is StoreError


def test_store_errors_keep_the_store_usable(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'x.db'}") as store:
        with pytest.raises(StoreError):
            store.create_run(
                job_name="hello",
                job_snapshot={"not json": object()},
                backend="local",
                app=None,
                region=None,
                max_attempts=1,
                timeout_s=None,
            )
        assert store.list_runs() == []
