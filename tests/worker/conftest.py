"""Helpers for the worker's tests: a local backend, in-process workers, the CLI, worker processes.

* In-process: one local backend per test module; every test has its own ledger (a SQLite file
  in its tmp_path, or a ``MemoryLedger``), and Runner + Worker pairs on the test's event loop.
* CLI: ``jobrunner ...`` as a subprocess, on the module's local backend and the test's ledger.
* Worker processes (``Fleet``): one JOBRUNNER_HOME per module, its local backend started first
  with ``jobrunner local start`` (so every worker shares it) and stopped with ``jobrunner local
  stop`` at the end; ``jobrunner worker`` processes write their output to files, and each test
  stops its own (SIGTERM once, then SIGKILL).

Every wait is a condition with a generous bound, never a fixed sleep.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from jobrunner.local.daemon import LocalEndpoint, ensure_running, stop_server
from jobrunner.machines import AsyncMachinesClient
from jobrunner.runner import Runner
from jobrunner.spec import Job
from jobrunner.store import Ledger, SqlLedger, Store
from jobrunner.testing import MemoryLedger
from jobrunner.worker import Worker

REPO = Path(__file__).resolve().parents[2]
APP = "jobrunner-local"
WAIT = 60.0  # seconds: generous, for a loaded 2-core CI machine


def sh(name: str, script: str, **extra: Any) -> Job:
    """A job running ``sh -c script`` (the local backend runs it on this host)."""
    return Job(name=name, image="alpine", cmd=["/bin/sh", "-c", script], **extra)


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = WAIT,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll ``condition`` (sync or async) until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:.0f} s")
        await anyio.sleep(interval)


def until_sync(
    condition: Callable[[], bool], timeout: float = WAIT, interval: float = 0.1, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} not met within {timeout:.0f} s")
        time.sleep(interval)


# ---- in-process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A JOBRUNNER_HOME whose local backend serves this module's tests."""
    home = tmp_path_factory.mktemp("worker-home")
    ensure_running(home / "local", port=0)
    try:
        yield home
    finally:
        stop_server(home / "local")


@pytest.fixture
def endpoint(backend_home: Path) -> LocalEndpoint:
    return ensure_running(backend_home / "local", port=0)


@pytest.fixture
async def client(endpoint: LocalEndpoint) -> AsyncIterator[AsyncMachinesClient]:
    async with AsyncMachinesClient(
        APP,
        token=endpoint.token,
        base_url=endpoint.base_url,
        logs_base_url=endpoint.base_url,
        rate_limit=False,
    ) as the_client:
        yield the_client


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def sqlite_store(ledger_url: str) -> Iterator[Store]:
    with Store(ledger_url) as store:
        yield store


@pytest.fixture(params=["sqlite", "memory"])
def ledger(request: pytest.FixtureRequest, ledger_url: str) -> Iterator[Ledger]:
    """The run ledger of one test: SQLite in tmp_path, or jobrunner.testing.MemoryLedger."""
    if request.param == "memory":
        yield MemoryLedger()
        return
    with Store(ledger_url) as store:
        yield SqlLedger(store)


def make_runner(client: AsyncMachinesClient, ledger: Ledger | Store) -> Runner:
    return Runner(
        client,
        ledger,
        backend="local",
        app=APP,
        environ={},
        log_poll_interval=0.05,
        log_drain_grace=0.2,
    )


@dataclass
class RunningWorker:
    worker: Worker
    runner: Runner
    stats: list[Any] = field(default_factory=list)  # WorkerStats, once run() returned


@asynccontextmanager
async def running_worker(
    client: AsyncMachinesClient, ledger: Ledger | Store, **options: Any
) -> AsyncIterator[RunningWorker]:
    """A Worker (with its own Runner: another claim owner, as another process would be) running
    in a task on this event loop; stopped (grace 5 s unless given) on exit."""
    options = {"poll_interval": 0.1, "orphan_interval": 0.5, "grace": 5.0, **options}
    runner = make_runner(client, ledger)
    worker = Worker(runner, **options)
    handle = RunningWorker(worker, runner)

    async def work() -> None:
        handle.stats.append(await worker.run())

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(work)
            try:
                yield handle
            finally:
                worker.stop()
    finally:
        await runner.aclose()


# ---- the CLI -----------------------------------------------------------------------------------


def cli_env(home: Path, database_url: str | None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FLY_", "JOBRUNNER_"))
    }
    env.update({"JOBRUNNER_HOME": str(home), "JOBRUNNER_LOCAL_PORT": "0", "NO_COLOR": "1"})
    if database_url is not None:
        env["JOBRUNNER_DATABASE_URL"] = database_url
    return env


@dataclass
class Cli:
    """``jobrunner`` as a subprocess, on the module's local backend and the test's ledger."""

    home: Path
    database_url: str
    logs: Path
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.env = cli_env(self.home, self.database_url)

    def __call__(self, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "jobrunner", *args],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def json(self, *args: str, timeout: float = 90.0) -> Any:
        done = self(*args, "--json", timeout=timeout)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def popen(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        """A background ``jobrunner`` process whose output goes to files under ``logs``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with (
            open(self.logs / f"{name}.out", "wb") as stdout,
            open(self.logs / f"{name}.err", "wb") as stderr,
        ):
            return subprocess.Popen(
                [sys.executable, "-m", "jobrunner", *args],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )


@pytest.fixture
def cli(backend_home: Path, ledger_url: str, tmp_path: Path) -> Cli:
    return Cli(backend_home, ledger_url, tmp_path / "cli-logs")


def wait_or_kill(process: subprocess.Popen[Any], deadline: float) -> None:
    """Wait for ``process`` until ``deadline`` (monotonic), then SIGKILL it; reaped."""
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


# ---- worker processes --------------------------------------------------------------------------


@dataclass
class Fleet:
    """``jobrunner worker`` processes sharing one JOBRUNNER_HOME (one local backend) and ledger."""

    home: Path
    database_url: str
    env: dict[str, str]
    logs: Path  # the workers' stdout and stderr files
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)  # indexes of workers the test SIGKILLed
    killed_at: datetime | None = None

    def start_worker(self, *extra: str) -> subprocess.Popen[bytes]:
        index = len(self.procs)
        logs = self.logs
        logs.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "jobrunner", "worker", "--concurrency", "16"]
        with (
            open(logs / f"worker-{index}.out", "wb") as stdout,
            open(logs / f"worker-{index}.err", "wb") as stderr,
        ):
            process = subprocess.Popen(
                [*command, "--grace", "5", *extra],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        self.procs.append(process)
        return process

    def stderr_of(self, index: int) -> str:
        path = self.logs / f"worker-{index}.err"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_serving(self, timeout: float = WAIT) -> None:
        """Until every worker said it serves its queues (or fail, quoting the one that did not)."""
        for index, process in enumerate(self.procs):

            def ready(index: int = index, process: subprocess.Popen[bytes] = process) -> bool:
                assert process.poll() is None, (
                    f"worker {index} exited with {process.returncode}:\n{self.stderr_of(index)}"
                )
                return "serving" in self.stderr_of(index)

            until_sync(ready, timeout=timeout, what=f"worker {index} serving")

    def stop(self, term_timeout: float = 30.0) -> list[int]:
        """SIGTERM every worker at once, SIGKILL those still alive after ``term_timeout``
        seconds; their exit codes."""
        for process in self.procs:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # once: a second one means "release now"
        deadline = time.monotonic() + term_timeout
        for process in self.procs:
            wait_or_kill(process, deadline)
        return [process.returncode for process in self.procs]

    def diagnostics(self) -> str:
        return "\n".join(
            f"--- worker {i} (rc {p.poll()}):\n{self.stderr_of(i)[-3000:]}"
            for i, p in enumerate(self.procs)
        )


@pytest.fixture(scope="module")
def fleet_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A JOBRUNNER_HOME whose local backend (started first, so every worker shares it) serves
    this module's worker processes; stopped with `jobrunner local stop` at the end."""
    home = tmp_path_factory.mktemp("fleet-home")
    env = cli_env(home, None)
    started = subprocess.run(
        [sys.executable, "-m", "jobrunner", "local", "start", "--port", "0", "--json"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 0, started.stderr
    try:
        yield home
    finally:
        subprocess.run(
            [sys.executable, "-m", "jobrunner", "local", "stop"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=90,
        )


@pytest.fixture
def make_fleet(fleet_home: Path, tmp_path: Path) -> Iterator[Callable[[str], Fleet]]:
    """``make_fleet(database_url)``: a Fleet on the module's home and the given ledger; its
    workers are stopped at the end of the test (SIGTERM, then SIGKILL)."""
    fleets: list[Fleet] = []

    def make(database_url: str) -> Fleet:
        env = cli_env(fleet_home, database_url)
        fleet = Fleet(fleet_home, database_url, env, tmp_path / f"workers-{len(fleets)}")
        fleets.append(fleet)
        return fleet

    try:
        yield make
    finally:
        for fleet in fleets:
            fleet.stop()
