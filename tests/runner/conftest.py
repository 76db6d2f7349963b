"""A real local Machines backend for the runner's tests, and runners wired to it.

One server per test module (starting one costs about a second); each test gets its own store
(SQLite and PostgreSQL, through the shared ``store`` fixture) and its own client.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from jobrunner.events import RunEvent
from jobrunner.local.daemon import LocalEndpoint, ensure_running, stop_server
from jobrunner.machines import AsyncMachinesClient
from jobrunner.runner import Runner
from jobrunner.spec import Job
from jobrunner.store import Store

APP = "jobrunner-local"
PY = sys.executable


@pytest.fixture(scope="module")
def local_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEndpoint]:
    state_dir = tmp_path_factory.mktemp("local-backend")
    endpoint = ensure_running(state_dir, port=0)
    try:
        yield endpoint
    finally:
        stop_server(state_dir)


def make_client(endpoint: LocalEndpoint) -> AsyncMachinesClient:
    return AsyncMachinesClient(
        APP, token=endpoint.token, base_url=endpoint.base_url, logs_base_url=endpoint.base_url
    )


class Recorder:
    """Collects the events a runner emits, for assertions."""

    def __init__(self) -> None:
        self.events: list[RunEvent] = []

    def __call__(self, event: RunEvent) -> None:
        self.events.append(event)

    def lines(self) -> list[str]:
        return [e.message for e in self.events if e.kind == "log"]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def client(local_backend: LocalEndpoint) -> AsyncIterator[AsyncMachinesClient]:
    async with make_client(local_backend) as the_client:
        yield the_client


def make_runner(
    client: AsyncMachinesClient,
    store: Store,
    recorder: Recorder | None = None,
    environ: dict[str, str] | None = None,
) -> Runner:
    return Runner(
        client,
        store,
        backend="local",
        app=APP,
        environ=environ or {},
        on_event=recorder or (lambda e: None),
        log_poll_interval=0.05,
        log_drain_grace=0.2,
    )


@pytest.fixture
def runner(client: AsyncMachinesClient, store: Store, recorder: Recorder) -> Runner:
    return make_runner(client, store, recorder)


def py_job(name: str, code: str, **extra: object) -> Job:
    """A job whose command is the test interpreter running ``code``."""
    return Job(name=name, image="python:3.12-slim", cmd=[PY, "-c", code], **extra)


def jobs_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "jobs"
