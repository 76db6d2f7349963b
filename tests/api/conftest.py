"""The Python API against a real local Machines backend.

One local backend per test module (starting one costs a few seconds) under a module-scoped
JOBRUNNER_HOME in tmp; every test gets its own ledger (``JOBRUNNER_DATABASE_URL`` in its
tmp_path, or a fresh PostgreSQL database for the tests that take ``any_ledger``), so no run of
one test is visible to another. Waits are condition waits with generous deadlines.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path

import anyio
import pytest

from jobrunner.handles import RunResult
from jobrunner.local.daemon import ensure_running, stop_server
from jobrunner.spec import Job

WAIT = 60.0  # seconds: generous, for a loaded CI machine


@pytest.fixture(scope="module")
def backend_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("api-home")
    ensure_running(home / "local", port=0)
    try:
        yield home
    finally:
        stop_server(home / "local")


@pytest.fixture(autouse=True)
def api_env(
    isolated_environment: Path,
    backend_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """This module's local backend, and a ledger of this test's own."""
    monkeypatch.setenv("JOBRUNNER_HOME", str(backend_home))
    monkeypatch.setenv("JOBRUNNER_LOCAL_PORT", "0")
    monkeypatch.setenv("JOBRUNNER_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    return backend_home


@pytest.fixture
def any_ledger(database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on SQLite and on PostgreSQL (skipped when no server answers)."""
    monkeypatch.setenv("JOBRUNNER_DATABASE_URL", database_url)
    return database_url


def sh(name: str, script: str, **extra: object) -> Job:
    """A job running ``sh -c script`` (the local backend runs it on this host)."""
    return Job(name=name, image="alpine", cmd=["sh", "-c", script], **extra)


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = WAIT) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not await condition():
            await anyio.sleep(0.05)


def until_sync(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def max_overlap(results: list[RunResult]) -> int:
    """The most runs whose [started_at, finished_at] intervals overlap at one instant."""
    edges: list[tuple[datetime, int]] = []
    for result in results:
        assert result.started_at is not None and result.finished_at is not None
        edges += [(result.started_at, 1), (result.finished_at, -1)]
    edges.sort(key=lambda edge: (edge[0], edge[1]))  # an end before a start at the same instant
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most
