"""Bring a database's schema to this version's head with Alembic, from code (no alembic.ini).

The migration scripts live in ``migrations/`` inside the package. Upgrading runs in one transaction
that also serialises concurrent openers: ``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped
advisory lock on PostgreSQL. So when several processes open a new database at once, one creates the
tables and the others find them done.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from jobrunner.store.errors import MigrationError, is_sqlite_busy

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "HEAD_REVISION",
    "MIGRATIONS_DIR",
    "alembic_config",
    "current_revision",
    "head_revision",
    "script_head_revision",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any fixed 64-bit number; it names the PostgreSQL advisory lock taken while migrating.
_PG_LOCK_KEY = 0x6A6F6272756E6E72  # "jobrunnr"
_VERSION_TABLE = "alembic_version"
# How long an opener waits for another process's migration of the same SQLite file.
MIGRATE_WAIT_S = 120.0
# The newest revision in migrations/versions. Kept here so that opening an up-to-date database
# never imports Alembic (a third of a CLI command's start-up time); a test checks it against
# Alembic's own idea of the head, so adding a migration without updating it fails CI.
HEAD_REVISION = "0004"


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic Config for the packaged scripts, optionally bound to an open connection."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this version of jobrunner ships."""
    return HEAD_REVISION


def script_head_revision() -> str | None:
    """The head according to Alembic's scripts (what ``HEAD_REVISION`` must equal)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


@functools.cache
def _known_revisions() -> frozenset[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    return frozenset(rev.revision for rev in script.walk_revisions())


def current_revision(connection: sa.Connection) -> str | None:
    """The revision the database is at (None for an empty database).

    Read with plain SQL: every Store open asks, and alembic's MigrationContext would log two INFO
    lines each time.
    """
    if not sa.inspect(connection).has_table(_VERSION_TABLE):
        return None
    rows = connection.execute(sa.text(f"SELECT version_num FROM {_VERSION_TABLE}")).all()
    return str(rows[0][0]) if rows else None


def upgrade(engine: Engine, *, revision: str = "head", where: str = "the database") -> None:
    """Upgrade the schema to ``revision``; raises :class:`MigrationError` if the database was
    written by a newer jobrunner (a revision this version does not know)."""
    target = head_revision() if revision == "head" else revision
    with engine.connect() as connection:  # the common case: already there, no lock needed
        if current_revision(connection) == target:
            return
    # SQLite: the first opener migrates inside BEGIN IMMEDIATE and the others wait for its
    # lock, but only for the busy timeout (5 s); a migration on a loaded machine (importing
    # Alembic, several scripts) can take longer, so they try again, for up to MIGRATE_WAIT_S.
    deadline = time.monotonic() + MIGRATE_WAIT_S
    while True:
        try:
            _upgrade_locked(engine, target, where)
            return
        except sa.exc.OperationalError as exc:
            busy = engine.dialect.name == "sqlite" and is_sqlite_busy(str(exc))
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _upgrade_locked(engine: Engine, target: str, where: str) -> None:
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        current = current_revision(connection)
        if current == target:
            return
        if current is not None and current not in _known_revisions():
            raise MigrationError(
                f"{where} is at schema revision {current!r}, which this version of jobrunner does "
                "not know (a newer jobrunner wrote it); upgrade jobrunner, or point "
                "JOBRUNNER_DATABASE_URL at another database"
            )
        from alembic import command

        command.upgrade(alembic_config(connection), target)
