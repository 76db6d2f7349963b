"""Every query the CLI runs is an index search, not a table scan (checked with SQLite's planner).

PostgreSQL's planner picks sequential scans for small tables whatever the indexes, so the plans
are checked on SQLite; the indexes themselves are the same on both (test_migrations compares the
migrated schema with the models on each).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobrunner.store import LogLineIn, Store
from jobrunner.store.store import _prefix_upper_bound

Plan = list[str]


@pytest.fixture
def planned(tmp_path: Path) -> Iterator[tuple[Store, list[str]]]:
    """A SQLite store with some rows, and the list of every statement it executes."""
    store = Store(f"sqlite:///{tmp_path / 'plans.db'}")
    for n in range(3):
        run = store.create_run(
            job_name=f"job{n}",
            job_snapshot={},
            backend="local",
            app="a",
            region=None,
            max_attempts=1,
            timeout_s=None,
        )
        store.create_attempt(run.id, 1, submit_id=f"{run.id}.1", region=None)
        store.update_attempt(run.id, 1, machine_id=f"m{n}")
        store.add_logs(run.id, 1, [LogLineIn(ts=datetime.now(UTC), message="x")])
    statements: list[str] = []

    def remember(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    sa.event.listen(store._engine, "before_cursor_execute", remember)
    try:
        yield store, statements
    finally:
        store.close()


def plans_of(store: Store, statements: list[str], call: Callable[[], object]) -> list[Plan]:
    """The query plans of the SELECTs that ``call`` makes."""
    statements.clear()
    call()
    seen = list(statements)
    plans = []
    with store._engine.connect() as connection:
        for statement in seen:
            # Parameters do not change SQLite's choice of index; NULL stands in for each.
            sql = re.sub(r"\?", "NULL", statement)
            rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}").all()
            plans.append([str(row[-1]) for row in rows])
    return plans


def test_the_cli_queries_use_indexes(planned: tuple[Store, list[str]]) -> None:
    store, statements = planned
    run = store.list_runs(limit=1)[0]
    calls: dict[str, Callable[[], object]] = {
        "runs list": lambda: store.list_runs(limit=50),
        "runs list --job": lambda: store.list_runs(job="job1", limit=50),
        "runs list --state": lambda: store.list_runs(state=["failed", "running"], limit=50),
        "runs show (prefix)": lambda: store.get_run(run.id[:20]),
        "runs show (full id)": lambda: store.get_run(run.id),
        "attempts": lambda: store.get_attempts(run.id),
        "latest attempt": lambda: store.latest_attempt(run.id),
        "transitions": lambda: store.transitions(run.id),
        "logs --follow": lambda: store.get_logs(run.id, after_id=1),
        "runs reconcile": store.list_unfinished_runs,
        "gc": store.machine_ids_of_live_runs,
    }
    for name, call in calls.items():
        plans = plans_of(store, statements, call)
        assert plans, name
        for plan in plans:
            scans = [step for step in plan if step.startswith("SCAN") and "INDEX" not in step]
            assert scans == [], f"{name} scans a table: {plan}"
            if name == "runs show (prefix)":
                # an index *search* on the key, not a walk over the whole index
                assert any(step.startswith("SEARCH runs") for step in plan), plan


def test_prefix_upper_bound() -> None:
    assert _prefix_upper_bound("01ABCD") == "01ABCE"
    assert _prefix_upper_bound("01ABC9") == "01ABCA"
    assert _prefix_upper_bound("01ABCH") == "01ABCJ"  # I is not in the id alphabet
    assert _prefix_upper_bound("01ABZZ") == "01AC"
    assert _prefix_upper_bound("ZZZZZZ") is None
