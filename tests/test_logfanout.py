"""LogFanout against a real local backend (real HTTP): one logs stream per app, split by machine.

Each test uses an app of its own, so the app's stream only carries that test's machines. The
logs API client's ``get_logs`` is wrapped to count requests and to see which were per instance.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from jobrunner import logfanout
from jobrunner.events import RunEvent
from jobrunner.local.daemon import LocalEndpoint, ensure_running, stop_server
from jobrunner.logfanout import LogFanout
from jobrunner.logsync import SecretMasker
from jobrunner.machines import AsyncMachinesClient
from jobrunner.machines.errors import BadRequest, ServerError, Unauthorized
from jobrunner.machines.models import LogsPage
from jobrunner.store import LogLineIn

IMAGE = "registry.example/test:1"
POLL = 0.05
GRACE = 0.3
WAIT = 20.0  # generous bound for every condition below


@pytest.fixture(scope="module")
def local_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEndpoint]:
    state_dir = tmp_path_factory.mktemp("fanout-backend")
    endpoint = ensure_running(state_dir, port=0)
    try:
        yield endpoint
    finally:
        stop_server(state_dir)


@pytest.fixture
async def client(local_backend: LocalEndpoint) -> AsyncIterator[AsyncMachinesClient]:
    async with AsyncMachinesClient(
        token=local_backend.token,
        base_url=local_backend.base_url,
        logs_base_url=local_backend.base_url,
    ) as the_client:
        yield the_client


async def new_app(client: AsyncMachinesClient) -> str:
    name = f"fanout-{uuid.uuid4().hex[:10]}"
    await client.create_app(name)
    return name


async def run_machine(client: AsyncMachinesClient, app: str, script: str) -> str:
    """Create a machine running ``sh -c script``; return its id."""
    config = {"image": IMAGE, "init": {"cmd": ["sh", "-c", script]}, "restart": {"policy": "no"}}
    machine = await client.create_machine(config, app=app)
    return machine.id


async def stopped(client: AsyncMachinesClient, app: str, machine_id: str) -> None:
    await client.wait(machine_id, "stopped", timeout=WAIT, app=app)


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await anyio.sleep(0.02)


class Ledger:
    """Stands in for the store's add_logs: dedupes on the line key, records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, list[LogLineIn]]] = []
        self.stored: dict[str, dict[str, LogLineIn]] = {}

    async def add_logs(self, run_id: str, attempt: int, lines: list[LogLineIn]) -> int:
        self.calls.append((run_id, attempt, list(lines)))
        stored = self.stored.setdefault(run_id, {})
        new = [line for line in lines if line.key() not in stored]
        for line in new:
            stored[line.key()] = line
        return len(new)

    def messages(self, run_id: str) -> list[str]:
        lines = sorted(self.stored.get(run_id, {}).values(), key=lambda line: line.ts)
        return [line.message for line in lines]

    def calls_for(self, run_id: str) -> int:
        return sum(1 for call in self.calls if call[0] == run_id)


class Events:
    def __init__(self) -> None:
        self.events: list[RunEvent] = []

    def __call__(self, event: RunEvent) -> None:
        self.events.append(event)

    def messages(self, run_id: str) -> list[str]:
        return [e.message for e in self.events if e.run_id == run_id and e.kind == "log"]


class LogRequests:
    """Wraps ``client.get_logs``: records each call, counts concurrent ones per app, and can
    fail calls on demand (``fail(call)`` returns an exception to raise, or None)."""

    def __init__(self, client: AsyncMachinesClient, monkeypatch: pytest.MonkeyPatch) -> None:
        self._get_logs = client.get_logs
        self.calls: list[dict[str, Any]] = []
        self.completed = 0
        self.returned: list[str] = []  # messages of every entry returned
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.fail: Callable[[dict[str, Any]], Exception | None] = lambda call: None
        monkeypatch.setattr(client, "get_logs", self)

    async def __call__(self, **kwargs: Any) -> LogsPage:
        self.calls.append(kwargs)
        app = kwargs["app"]
        self.in_flight[app] += 1
        self.max_in_flight[app] = max(self.max_in_flight[app], self.in_flight[app])
        try:
            error = self.fail(kwargs)
            if error is not None:
                raise error
            page: LogsPage = await self._get_logs(**kwargs)
            self.returned.extend(entry.message for entry in page.entries)
            return page
        finally:
            self.in_flight[app] -= 1
            self.completed += 1

    def instances(self) -> set[str | None]:
        return {call.get("instance") for call in self.calls}


@pytest.fixture
def requests(client: AsyncMachinesClient, monkeypatch: pytest.MonkeyPatch) -> LogRequests:
    return LogRequests(client, monkeypatch)


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def events() -> Events:
    return Events()


@asynccontextmanager
async def running(
    client: AsyncMachinesClient, ledger: Ledger, events: Events, grace: float = GRACE
) -> AsyncIterator[LogFanout]:
    fanout = LogFanout(
        client, ledger.add_logs, on_event=events, poll_interval=POLL, drain_grace=grace
    )
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(fanout.run)
        try:
            yield fanout
        finally:
            tasks.cancel_scope.cancel()


def follow(
    fanout: LogFanout,
    app: str,
    machine_id: str,
    since: datetime,
    secrets: tuple[str, ...] = (),
) -> str:
    """Follow ``machine_id`` for a run named after it; return the run id."""
    run_id = f"run-{machine_id}"
    fanout.follow(
        app=app,
        machine_id=machine_id,
        run_id=run_id,
        attempt=1,
        since=since,
        masker=SecretMasker(secrets),
    )
    return run_id


async def finish(fanout: LogFanout, *machine_ids: str) -> None:
    for machine_id in machine_ids:
        fanout.machine_exited(machine_id)
    with anyio.fail_after(WAIT):
        for machine_id in machine_ids:
            await fanout.drained(machine_id)


async def test_three_machines_share_one_stream(
    client: AsyncMachinesClient, requests: LogRequests, ledger: Ledger, events: Events
) -> None:
    app = await new_app(client)
    async with running(client, ledger, events) as fanout:
        runs: dict[str, str] = {}
        expected: dict[str, list[str]] = {}
        for name in ("a", "b", "c"):
            since = datetime.now(UTC)
            # Interleaved output: the three machines print at the same time.
            machine_id = await run_machine(
                client, app, f"for i in $(seq 1 12); do echo {name}-$i; sleep 0.02; done"
            )
            runs[machine_id] = follow(fanout, app, machine_id, since)
            expected[machine_id] = [f"{name}-{i}" for i in range(1, 13)]
        for machine_id in runs:
            await stopped(client, app, machine_id)
        await finish(fanout, *runs)
        assert not fanout.busy

    for machine_id, run_id in runs.items():
        assert ledger.messages(run_id) == expected[machine_id]  # own lines, all, once, in order
        assert events.messages(run_id) == expected[machine_id]
        assert {e.machine_id for e in events.events if e.run_id == run_id} == {machine_id}
    # One stream: app-wide requests only, never two at once, no per-machine requests.
    assert requests.instances() == {None}
    assert {call["app"] for call in requests.calls} == {app}
    assert requests.max_in_flight[app] == 1
    # Batched: at most one add_logs call per follower per page read.
    for run_id in runs.values():
        assert ledger.calls_for(run_id) <= requests.completed


@pytest.mark.parametrize("kept_by", ["buffer", "catch_up"])
async def test_lines_printed_before_follow_are_kept(
    kept_by: str,
    client: AsyncMachinesClient,
    requests: LogRequests,
    ledger: Ledger,
    events: Events,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if kept_by == "catch_up":
        monkeypatch.setattr(logfanout, "BUFFER_LINES", 0)  # the buffer drops every line at once
    app = await new_app(client)
    async with running(client, ledger, events) as fanout:
        first = await run_machine(client, app, "echo first-1")
        follow(fanout, app, first, datetime.now(UTC) - timedelta(seconds=1))
        await until(lambda: requests.completed > 0, "the app's stream to start")

        since = datetime.now(UTC)
        late = await run_machine(client, app, "for i in $(seq 1 50); do echo late-$i; done")
        await stopped(client, app, late)
        # The stream reads the machine's lines before anyone follows it.
        await until(lambda: "late-50" in requests.returned, "the stream to read late-50")
        run_id = follow(fanout, app, late, since)
        await finish(fanout, late, first)

    expected = [f"late-{i}" for i in range(1, 51)]
    assert ledger.messages(run_id) == expected
    assert events.messages(run_id) == expected
    if kept_by == "buffer":
        assert requests.instances() == {None}  # no catch-up was needed
        assert ledger.calls_for(run_id) == 1  # the buffered lines are stored in one call
    else:
        assert requests.instances() == {None, late}  # a catch-up for that machine only


async def test_adopted_machine_with_an_old_since_catches_up(
    client: AsyncMachinesClient,
    requests: LogRequests,
    ledger: Ledger,
    events: Events,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without the 5-minute margin, a stream started now cannot see lines of a moment ago.
    monkeypatch.setattr(logfanout, "START_MARGIN", timedelta(0))
    app = await new_app(client)
    old_since = datetime.now(UTC)
    adopted = await run_machine(client, app, "for i in $(seq 1 30); do echo old-$i; done")
    await stopped(client, app, adopted)

    async with running(client, ledger, events) as fanout:
        since = datetime.now(UTC)
        current = await run_machine(client, app, "echo current-1")
        current_run = follow(fanout, app, current, since)
        await until(lambda: ledger.messages(current_run) == ["current-1"], "current-1")
        assert "old-1" not in requests.returned  # the stream began after the adopted lines

        adopted_run = follow(fanout, app, adopted, old_since)
        follow(fanout, app, adopted, old_since)  # idempotent
        await finish(fanout, adopted, current)

    expected = [f"old-{i}" for i in range(1, 31)]
    assert ledger.messages(adopted_run) == expected
    assert events.messages(adopted_run) == expected
    catch_ups = [call for call in requests.calls if call.get("instance") is not None]
    assert catch_ups and {call["instance"] for call in catch_ups} == {adopted}


async def test_secrets_are_masked(
    client: AsyncMachinesClient, requests: LogRequests, ledger: Ledger, events: Events
) -> None:
    app = await new_app(client)
    secret = "hunter2-very-secret"
    async with running(client, ledger, events) as fanout:
        since = datetime.now(UTC)
        machine_id = await run_machine(client, app, f"echo password={secret}; echo done")
        run_id = follow(fanout, app, machine_id, since, secrets=(secret,))
        await stopped(client, app, machine_id)
        await finish(fanout, machine_id)

    assert ledger.messages(run_id) == ["password=***", "done"]
    assert events.messages(run_id) == ["password=***", "done"]
    assert all(secret not in line.message for _, _, lines in ledger.calls for line in lines)


async def test_drained_returns_after_the_grace_and_keeps_late_lines(
    client: AsyncMachinesClient, requests: LogRequests, ledger: Ledger, events: Events
) -> None:
    app = await new_app(client)
    grace = 1.5
    async with running(client, ledger, events, grace=grace) as fanout:
        with anyio.fail_after(1):
            await fanout.drained("never-followed")  # returns at once

        since = datetime.now(UTC)
        machine_id = await run_machine(client, app, "sleep 0.3; echo late-line")
        run_id = follow(fanout, app, machine_id, since)
        await client.wait(machine_id, "started", timeout=WAIT, app=app)
        # Exited (as far as the fan-out knows) before the line is printed: the grace covers it.
        started = time.monotonic()
        fanout.machine_exited(machine_id)
        assert fanout.busy
        with anyio.fail_after(WAIT):
            await fanout.drained(machine_id)
        elapsed = time.monotonic() - started

    assert grace <= elapsed < grace + 10
    assert ledger.messages(run_id) == ["late-line"]
    assert not fanout.busy


async def test_an_app_loop_runs_only_while_the_app_has_followers(
    client: AsyncMachinesClient, requests: LogRequests, ledger: Ledger, events: Events
) -> None:
    one, two = await new_app(client), await new_app(client)
    async with running(client, ledger, events) as fanout:
        assert fanout.polling_apps == frozenset()
        since = datetime.now(UTC)
        in_one = await run_machine(client, one, "echo one-1")
        in_two = await run_machine(client, two, "echo two-1")
        run_one = follow(fanout, one, in_one, since)
        run_two = follow(fanout, two, in_two, since)
        await stopped(client, one, in_one)
        await stopped(client, two, in_two)
        await until(lambda: fanout.polling_apps == {one, two}, "both app loops")

        await finish(fanout, in_one)
        await until(lambda: fanout.polling_apps == {two}, "app one's loop to stop")
        calls_to_one = sum(1 for call in requests.calls if call["app"] == one)
        await until(lambda: ledger.messages(run_two) == ["two-1"], "two-1")
        await until(
            lambda: sum(1 for call in requests.calls if call["app"] == two) > 3,
            "app two's loop to go on",
        )
        assert sum(1 for call in requests.calls if call["app"] == one) == calls_to_one

        await finish(fanout, in_two)
        await until(lambda: fanout.polling_apps == frozenset(), "every loop to stop")

        # Following again starts the app's loop again.
        since = datetime.now(UTC)
        again = await run_machine(client, one, "echo one-again")
        run_again = follow(fanout, one, again, since)
        await until(lambda: fanout.polling_apps == {one}, "app one's loop to restart")
        await stopped(client, one, again)
        await finish(fanout, again)

    assert ledger.messages(run_one) == ["one-1"]
    assert ledger.messages(run_again) == ["one-again"]
    assert requests.max_in_flight[one] == 1 and requests.max_in_flight[two] == 1


async def test_errors_back_off_and_a_refused_start_token_falls_back(
    client: AsyncMachinesClient,
    requests: LogRequests,
    ledger: Ledger,
    events: Events,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(logfanout, "ERROR_FIRST_DELAY", 0.01)
    monkeypatch.setattr(logfanout, "ERROR_MAX_DELAY", 0.05)
    monkeypatch.setattr(logfanout, "SLOW_RETRY", 0.2)

    def fail(call: dict[str, Any]) -> Exception | None:
        # First our start token is refused ("a logs API that does not take it")...
        fell_back = any(c["next_token"] is None for c in requests.calls)
        if call["next_token"] and not fell_back:
            return BadRequest(status_code=400, method="GET", path="/logs")
        if len(requests.calls) <= 8:  # ...then an outage long enough to count as one
            return ServerError(status_code=503, method="GET", path="/logs")
        return None

    requests.fail = fail
    app = await new_app(client)
    caplog.set_level(logging.INFO, logger="jobrunner.logfanout")
    async with running(client, ledger, events) as fanout:
        since = datetime.now(UTC)
        machine_id = await run_machine(client, app, "echo survived-1; echo survived-2")
        run_id = follow(fanout, app, machine_id, since)
        await stopped(client, app, machine_id)
        await until(lambda: ledger.messages(run_id) == ["survived-1", "survived-2"], "the lines")
        await finish(fanout, machine_id)

    assert events.messages(run_id) == ["survived-1", "survived-2"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0]
    assert any("available again" in r.getMessage() for r in caplog.records)


async def test_unavailable_logs_do_not_hold_up_a_drain(
    client: AsyncMachinesClient,
    requests: LogRequests,
    ledger: Ledger,
    events: Events,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(logfanout, "SLOW_RETRY", 0.2)
    requests.fail = lambda call: Unauthorized(status_code=401, method="GET", path="/logs")
    app = await new_app(client)
    async with running(client, ledger, events) as fanout:
        since = datetime.now(UTC)
        machine_id = await run_machine(client, app, "echo lost")
        follow(fanout, app, machine_id, since)
        await until(lambda: len(requests.calls) >= 3, "a few retries")
        await finish(fanout, machine_id)
        assert fanout.polling_apps == frozenset()

    assert ledger.calls == []
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1


def test_it_can_be_built_outside_an_event_loop() -> None:
    # A LogFanout can be built outside an event loop (the runner builds it in __init__).
    fanout = LogFanout(
        None,  # type: ignore[arg-type]
        Ledger().add_logs,
        on_event=Events(),
        poll_interval=POLL,
        drain_grace=GRACE,
    )
    fanout.follow(
        app="app",
        machine_id="m1",
        run_id="r1",
        attempt=1,
        since=datetime.now(UTC),
        masker=SecretMasker(()),
    )
    assert fanout.busy and fanout.polling_apps == frozenset()
