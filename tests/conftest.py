"""Fixtures shared by every test directory.

- ``isolated_environment`` (autouse): ``JOBRUNNER_HOME`` is a fresh temporary folder and the Fly
  token, app and database URL variables are removed, so no test touches the user's home, their
  database or a real Fly account.
- ``database_url``: parametrized over ``sqlite`` (a file in tmp_path) and ``postgres`` (a fresh
  database on 127.0.0.1:5432, dropped afterwards). When PostgreSQL does not answer, the postgres
  case is skipped with a one-line reason, or fails if ``JOBRUNNER_REQUIRE_POSTGRES=1``.
- ``store``: a :class:`jobrunner.store.Store` on ``database_url``, closed afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from jobrunner.store import Store

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
POSTGRES_URL_TEMPLATE = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
REMOVED_VARIABLES = ("FLY_API_TOKEN", "FLY_ACCESS_TOKEN", "JOBRUNNER_DATABASE_URL", "FLY_APP")

_postgres_problem: list[str | None] = []  # memo: [None] = reachable, [reason] = not


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point JOBRUNNER_HOME at a temporary folder and drop Fly/database settings."""
    home = tmp_path / "jobrunner-home"
    monkeypatch.setenv("JOBRUNNER_HOME", str(home))
    for name in REMOVED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return home


def _postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used (None when it can); asked once per test session."""
    if not _postgres_problem:
        try:
            import psycopg

            with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
                pass
            _postgres_problem.append(None)
        except Exception as exc:  # any failure means "not available here"
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            _postgres_problem.append(f"PostgreSQL at 127.0.0.1:5432 unavailable: {first_line}")
    return _postgres_problem[0]


def _require_postgres() -> None:
    problem = _postgres_unreachable()
    if problem is None:
        return
    if os.environ.get("JOBRUNNER_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{problem} (JOBRUNNER_REQUIRE_POSTGRES=1 makes this a failure)")
    pytest.skip(problem)


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create a uniquely named database on 127.0.0.1:5432 and drop it (forcefully) afterwards."""
    import psycopg
    from psycopg import sql

    name = f"jobrunner_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield POSTGRES_URL_TEMPLATE.format(name=name)
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            admin.execute(drop.format(sql.Identifier(name)))


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL for an empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    _require_postgres()
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A migrated Store on ``database_url``."""
    # Imported here so that a broken store cannot stop unrelated test directories from loading.
    from jobrunner.store import Store

    the_store = Store(database_url)
    try:
        yield the_store
    finally:
        the_store.close()
