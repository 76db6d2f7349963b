"""Schema migrations: fresh databases reach head, old ones upgrade in place, models match."""

from __future__ import annotations

import multiprocessing
import os
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from jobrunner.store import LogLineIn, MigrationError, Store
from jobrunner.store.engine import create_store_engine
from jobrunner.store.migrate import alembic_config, current_revision, head_revision
from jobrunner.store.tables import METADATA

FIRST_REVISION = "0001"
LEDGER_TABLES = {"runs", "attempts", "run_transitions", "log_lines"}


def test_a_new_database_is_created_at_head(database_url: str) -> None:
    Store(database_url).close()

    engine = create_store_engine(database_url)
    try:
        with engine.connect() as connection:
            assert current_revision(connection) == head_revision()
            assert set(sa.inspect(connection).get_table_names()) >= LEDGER_TABLES
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    Store(database_url).close()

    engine = create_store_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, METADATA)
    finally:
        engine.dispose()

    assert differences == []


def _v1_table(name: str, *columns: sa.ColumnClause[object]) -> sa.TableClause:
    """A lightweight handle on a table as revision 0001 created it (independent of the models)."""
    return sa.table(name, *columns)


WHEN = sa.DateTime(timezone=True)
V1_RUNS = _v1_table(
    "runs",
    *(sa.column(c) for c in ("id", "job_name", "backend", "app", "state", "exit_code", "trigger")),
    *(sa.column(c) for c in ("attempts", "max_attempts", "cancel_requested")),
    sa.column("job_snapshot", sa.JSON()),
    *(sa.column(c, WHEN) for c in ("created_at", "started_at", "finished_at", "updated_at")),
)
V1_ATTEMPTS = _v1_table(
    "attempts",
    *(sa.column(c) for c in ("run_id", "number", "submit_id", "machine_id", "state", "outcome")),
    sa.column("exit_code"),
    sa.column("created_at", WHEN),
)
V1_TRANSITIONS = _v1_table(
    "run_transitions",
    *(sa.column(c) for c in ("run_id", "from_state", "to_state")),
    sa.column("at", WHEN),
)
V1_LOGS = _v1_table(
    "log_lines",
    *(sa.column(c) for c in ("run_id", "attempt_number", "entry_id", "stream", "message")),
    sa.column("ts", WHEN),
)


def test_upgrade_keeps_existing_history(database_url: str) -> None:
    # A database left at the first revision by an older jobrunner, with a finished run in it.
    at = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    run_id = "01JGZZZZZZZZZZZZZZZZZZZZZZ"
    engine = create_store_engine(database_url)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), FIRST_REVISION)
        with engine.begin() as connection:
            connection.execute(
                V1_RUNS.insert().values(
                    id=run_id,
                    job_name="hello",
                    job_snapshot={"name": "hello"},
                    backend="local",
                    app="jobrunner-local",
                    state="succeeded",
                    exit_code=0,
                    attempts=1,
                    max_attempts=1,
                    trigger="cli",
                    cancel_requested=False,
                    created_at=at,
                    started_at=at,
                    finished_at=at,
                    updated_at=at,
                )
            )
            connection.execute(
                V1_ATTEMPTS.insert().values(
                    run_id=run_id,
                    number=1,
                    submit_id=f"{run_id}.1",
                    machine_id="m1",
                    state="finished",
                    outcome="succeeded",
                    exit_code=0,
                    created_at=at,
                )
            )
            connection.execute(
                V1_TRANSITIONS.insert().values(
                    run_id=run_id, from_state="running", to_state="succeeded", at=at
                )
            )
            connection.execute(
                V1_LOGS.insert().values(
                    run_id=run_id,
                    attempt_number=1,
                    entry_id="e1",
                    stream="stdout",
                    message="hello, world",
                    ts=at,
                )
            )
    finally:
        engine.dispose()

    with Store(database_url) as store:
        run = store.get_run(run_id)
        assert (run.job_name, run.state, run.exit_code) == ("hello", "succeeded", 0)
        assert run.job_snapshot == {"name": "hello"}
        assert run.finished_at == at
        # Columns added by later revisions get their defaults (0002: the queue).
        assert (run.queue, run.priority, run.idempotency_key) == (None, 0, None)
        assert [(a.number, a.machine_id) for a in store.get_attempts(run_id)] == [(1, "m1")]
        assert [t.to_state for t in store.transitions(run_id)] == ["succeeded"]
        assert [line.message for line in store.get_logs(run_id)] == ["hello, world"]
        # The upgraded database takes new rows next to the old ones.
        assert store.add_logs(run_id, 1, [LogLineIn(ts=at, message="more", entry_id="e2")]) == 1


def test_a_database_from_a_newer_jobrunner_is_refused(database_url: str) -> None:
    Store(database_url).close()
    engine = create_store_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    finally:
        engine.dispose()

    with pytest.raises(MigrationError, match=r"9999_future.*upgrade jobrunner"):
        Store(database_url)


def _open_in_child(url: str, barrier: Barrier, out: Connection) -> None:
    code = 0
    try:
        barrier.wait(timeout=20)
        with Store(url) as store:
            out.send(store.list_runs() == [])
    except BaseException as exc:
        out.send(repr(exc))
        code = 1
    finally:
        os._exit(code)  # leave inherited connections alone


def test_processes_opening_a_new_database_at_once_all_succeed(database_url: str) -> None:
    # "spawn", not "fork": by the time this runs, the test process has threads (event-loop
    # portals, thread pools), and a forked child can inherit a lock one of them held.
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    pipes = [context.Pipe(duplex=False) for _ in range(3)]
    children = [
        context.Process(target=_open_in_child, args=(database_url, barrier, sender))
        for _receiver, sender in pipes
    ]
    for child in children:
        child.start()
    results = []
    for receiver, _sender in pipes:
        assert receiver.poll(60), "a child did not report"
        results.append(receiver.recv())
    for child in children:
        child.join(timeout=30)

    assert results == [True, True, True]


def test_head_revision_constant_matches_the_migration_scripts() -> None:
    """Opening a current database skips Alembic by trusting HEAD_REVISION; it must be true."""
    from jobrunner.store.migrate import HEAD_REVISION, script_head_revision

    assert script_head_revision() == HEAD_REVISION
