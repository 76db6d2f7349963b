"""The Python entry points, JobRunner (sync) and AsyncJobRunner, as a task queue would use them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobrunner.api import AsyncJobRunner, JobRunner
from jobrunner.local.daemon import stop_server
from jobrunner.spec import Job


@pytest.fixture
def local_home(isolated_environment: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("JOBRUNNER_LOCAL_PORT", "0")
    try:
        yield isolated_environment
    finally:
        stop_server(isolated_environment / "local")


def job(code: str) -> Job:
    return Job(name="api", image="python:3.12-slim", cmd=[sys.executable, "-c", code])


def test_sync_runner_runs_submits_waits_and_reads_logs(local_home: Path) -> None:
    with JobRunner() as jr:
        done = jr.run(job("print('from python')"))
        assert (done.state, done.exit_code) == ("succeeded", 0)
        assert jr.logs(done.id) == ["from python"]

        queued = jr.submit(job("raise SystemExit(4)"))
        assert jr.get(queued.id).state == "pending"  # nothing runs until someone drives it
        finished = jr.wait(queued.id)
        assert (finished.state, finished.exit_code) == ("failed", 4)
    assert (local_home / "jobrunner.db").exists()


async def test_async_runner_cancels_a_pending_run(local_home: Path) -> None:
    async with AsyncJobRunner() as jr:
        queued = await jr.submit(job("import time; time.sleep(60)"))
        cancelled = await jr.cancel(queued.id)
        assert cancelled.state == "cancelled"
