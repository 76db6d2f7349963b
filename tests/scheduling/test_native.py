"""Native schedules (jobrunner.native) against a real local backend over HTTP.

Sync tests share one server on the real clock (each test in an app of its own). The month test
gets a server of its own on a fake clock, moved through the admin endpoint: a fresh one per test,
because a log window's first bound comes from the (fake) start time, which must still be close to
the real time the lines are stamped with.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from jobrunner.machines import AsyncMachinesClient, Machine, NotFound
from jobrunner.machines.models import ExitEvent, MachineEvent, MachineRequest
from jobrunner.native import (
    SCHEDULE_TAG,
    SECRETS_TAG,
    SPEC_TAG,
    ImportReport,
    apply_sync,
    import_runs,
    native_config,
    native_runs,
    plan_sync,
    spec_hash,
    sync_lines,
    sync_report,
)
from jobrunner.runner import MANAGED_TAG
from jobrunner.spec import Job
from jobrunner.spec.problems import JobSpecError
from jobrunner.store import Store
from tests.local.local_harness import TOKEN, ServerProcess, start_server

DAY = 86_400
WAIT = 30.0
SECRET = "s3cret-native-value"
ENVIRON = {"NATIVE_TOKEN": SECRET}


def sh(name: str, script: str, **extra: Any) -> Job:
    return Job(
        name=name,
        image="alpine:3",
        cmd=["/bin/sh", "-c", script],
        schedule=extra.pop("schedule", "daily"),
        native=extra.pop("native", True),
        **extra,
    )


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await anyio.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("native") / "state", "--enable-admin")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = start_server(tmp_path / "fake-state", "--enable-admin", "--fake-clock")
    try:
        yield process
    finally:
        process.stop()


async def _client_in_new_app(server: ServerProcess) -> AsyncMachinesClient:
    app = f"native-{uuid.uuid4().hex[:10]}"
    # No client-side rate limits (Fly's 1 request/s per action): this is the local backend.
    client = AsyncMachinesClient(
        app,
        token=TOKEN,
        base_url=server.base_url,
        logs_base_url=server.base_url,
        rate_limit=False,
    )
    await client.create_app(app)
    return client


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[AsyncMachinesClient]:
    the_client = await _client_in_new_app(server)
    try:
        yield the_client
    finally:
        await the_client.aclose()


def app_of(client: AsyncMachinesClient) -> str:
    return str(client.config.app)


async def sync(client: AsyncMachinesClient, jobs: list[Job], **kwargs: Any) -> list[Any]:
    actions = await plan_sync(client, jobs, app=app_of(client), environ=ENVIRON)
    return await apply_sync(client, actions, **kwargs)


async def schedule_machines(client: AsyncMachinesClient) -> dict[str, Machine]:
    machines = await client.list_machines(metadata={MANAGED_TAG: "true"})
    return {str(m.metadata_value(SCHEDULE_TAG)): m for m in machines}


async def settle(client: AsyncMachinesClient, machine_id: str) -> Machine:
    """Wait until the machine's run at sync time is over (a synced machine boots at once)."""

    async def stopped() -> bool:
        machine = await client.get_machine(machine_id)
        return machine.state == "stopped" and machine.last_exit() is not None

    await until(stopped, f"machine {machine_id} to stop")
    return await client.get_machine(machine_id)


# ----- config and spec ------------------------------------------------------------------------


def test_native_config_is_persistent_scheduled_and_tagged() -> None:
    job = sh("nightly", "echo hi", secrets=["NATIVE_TOKEN"], metadata={"team": "data"})
    config = native_config(job, environ=ENVIRON)
    assert config.schedule == "daily" and config.auto_destroy is False
    assert config.restart is not None and config.restart.policy == "no"
    tags = config.metadata or {}
    assert tags[MANAGED_TAG] == "true" and tags[SCHEDULE_TAG] == "nightly"
    assert tags[SECRETS_TAG] == "NATIVE_TOKEN" and tags["team"] == "data"
    assert tags[SPEC_TAG] == spec_hash(config)  # the hash leaves itself out
    assert native_config(job, environ=ENVIRON) == config  # stable
    rotated = native_config(job, environ={"NATIVE_TOKEN": "another-value"})
    assert (rotated.metadata or {})[SPEC_TAG] != tags[SPEC_TAG]
    retried = native_config(sh("r", "false", retries={"max_attempts": 3}), environ={})
    assert retried.restart is not None
    assert (retried.restart.policy, retried.restart.max_retries) == ("on-failure", 2)
    with pytest.raises(ValueError, match="not a native schedule"):
        native_config(sh("plain", "true", schedule=None, native=False), environ={})


def test_a_native_job_on_a_cron_expression_is_refused_when_loaded() -> None:
    with pytest.raises(JobSpecError) as caught:
        Job.parse({"name": "x", "image": "alpine", "cmd": "true", "schedule": "*/5 * * * *",
                   "native": True})  # fmt: skip
    assert "schedule" in {p.key for p in caught.value.problems}


# ----- sync ------------------------------------------------------------------------------------


async def test_sync_creates_one_machine_per_native_job_and_a_second_sync_does_nothing(
    client: AsyncMachinesClient,
) -> None:
    jobs = [
        sh("nightly", "echo night", secrets=["NATIVE_TOKEN"]),
        sh("hourly-report", "echo hour", schedule="hourly"),
        Job(name="one-off", image="alpine", cmd=["true"]),
    ]
    planned = await plan_sync(client, jobs, app=app_of(client), environ=ENVIRON)
    assert [(a.kind, a.job_name) for a in planned] == [
        ("create", "hourly-report"),
        ("create", "nightly"),
    ]
    assert await schedule_machines(client) == {}  # a dry run changes nothing
    dry = sync_report(planned, [], None, dry_run=True)
    assert any("would create" in line for line in sync_lines(dry))

    results = await apply_sync(client, planned)
    assert [r.status for r in results] == ["done", "done"]
    machines = await schedule_machines(client)
    assert set(machines) == {"nightly", "hourly-report"}
    for job in jobs[:2]:
        machine = machines[job.name]
        config = machine.config
        assert config is not None
        assert config.schedule == job.schedule and not config.auto_destroy
        assert config.restart is not None and config.restart.policy == "no"
        wanted = native_config(job, environ=ENVIRON)
        assert machine.metadata_value(SPEC_TAG) == (wanted.metadata or {})[SPEC_TAG]
        assert machine.metadata_value(MANAGED_TAG) == "true"
    assert machines["nightly"].metadata_value(SECRETS_TAG) == "NATIVE_TOKEN"

    again = await sync(client, jobs)
    assert [(r.action.kind, r.status) for r in again] == [("unchanged", "unchanged")] * 2
    after = await schedule_machines(client)
    assert {n: (m.id, m.instance_id) for n, m in after.items()} == {
        n: (m.id, m.instance_id) for n, m in machines.items()
    }


async def test_a_changed_command_updates_the_machine_under_a_lease(
    client: AsyncMachinesClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = sh("nightly", "echo one")
    await sync(client, [job])
    machine = await settle(client, (await schedule_machines(client))["nightly"].id)

    calls: list[tuple[str, Any]] = []
    for name in ("acquire_lease", "update_machine", "release_lease"):
        original = getattr(client, name)

        def spy(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls.append((_name, kw.get("nonce", args[1] if len(args) > 1 else None)))
            return _original(*args, **kw)

        monkeypatch.setattr(client, name, spy)

    changed = sh("nightly", "echo two")
    planned = await plan_sync(client, [changed], app=app_of(client), environ=ENVIRON)
    assert [(a.kind, a.machine_id) for a in planned] == [("update", machine.id)]
    assert "init" in planned[0].reason
    results = await apply_sync(client, planned)
    assert [r.status for r in results] == ["done"], results
    assert [name for name, _ in calls] == ["acquire_lease", "update_machine", "release_lease"]
    nonce = calls[1][1]
    assert nonce and calls[2][1] == nonce  # the update carried the lease's nonce
    with pytest.raises(NotFound):
        await client.get_lease(machine.id)  # released

    updated = await client.get_machine(machine.id)
    assert updated.config is not None and updated.config.init is not None
    assert updated.config.init.cmd == ["/bin/sh", "-c", "echo two"]
    assert updated.instance_id != machine.instance_id
    await settle(client, machine.id)
    again = await sync(client, [changed])
    assert [r.status for r in again] == ["unchanged"]


async def test_a_removed_or_no_longer_native_job_loses_its_machine(
    client: AsyncMachinesClient,
) -> None:
    jobs = [sh("keep", "true"), sh("drop", "true"), sh("demote", "true")]
    await sync(client, jobs)
    machines = await schedule_machines(client)
    for machine in machines.values():
        await settle(client, machine.id)

    remaining = [jobs[0], Job(name="demote", image="alpine", cmd=["true"])]
    planned = await plan_sync(client, remaining, app=app_of(client), environ=ENVIRON)
    kinds = {a.job_name: (a.kind, a.reason) for a in planned}
    assert kinds == {
        "demote": ("destroy", "its job is no longer a native schedule"),
        "drop": ("destroy", "its job is gone"),
        "keep": ("unchanged", kinds["keep"][1]),
    }
    results = await apply_sync(client, planned)
    assert all(r.ok for r in results), results
    for name in ("drop", "demote"):
        assert (await client.get_machine(machines[name].id)).state == "destroyed"
    assert set(await schedule_machines(client)) == {"keep"}
    assert [r.status for r in await sync(client, remaining)] == ["unchanged"]


async def test_a_running_machine_is_left_alone_unless_interrupted_and_a_foreign_lease_fails(
    client: AsyncMachinesClient,
) -> None:
    await sync(client, [sh("slow", "sleep 30")])
    machine = (await schedule_machines(client))["slow"]
    await client.wait(machine, "started", timeout=WAIT)

    results = await sync(client, [sh("slow", "true")])
    assert [r.status for r in results] == ["deferred"]
    assert "started" in results[0].message
    results = await sync(client, [sh("slow", "true")], interrupt=True)
    assert [r.status for r in results] == ["done"]
    await settle(client, machine.id)

    lease = await client.acquire_lease(machine.id, ttl=60, description="someone else")
    assert lease.data is not None and lease.data.nonce
    results = await sync(client, [])
    assert [(r.action.kind, r.status) for r in results] == [("destroy", "failed")]
    assert "409" in results[0].message or "lease" in results[0].message.lower()
    await client.release_lease(machine.id, lease.data.nonce)
    assert [r.status for r in await sync(client, [])] == ["done"]


# ----- import ----------------------------------------------------------------------------------


async def test_a_month_of_a_daily_schedule_is_imported_once_with_exit_codes_and_logs(
    fake_server: ServerProcess, store: Store
) -> None:
    client = await _client_in_new_app(fake_server)
    app = app_of(client)
    # The sleep keeps the lines ahead of the exit: the local backend stamps an exit before it
    # drains the process's pipes, and a line's time decides its run.
    script = 'echo "tick $NATIVE_TOKEN"; echo warn >&2; sleep 0.1; exit 3'
    job = sh("nightly", script, secrets=["NATIVE_TOKEN"])

    async def import_now() -> ImportReport:
        return await import_runs(client, store, app=app, backend="local", settle=0)

    try:
        await sync(client, [job])
        machine = await settle(client, (await schedule_machines(client))["nightly"].id)
        # Imported after every run, as a periodic sync would: the local backend stamps log lines
        # with the real time but drops them after a week of its fake clock.
        reports = [await import_now()]
        async with fake_server.client() as admin:
            for _ in range(30):
                before = (await client.list_events(machine.id))[0].id
                answer = await admin.post("/_admin/clock", json={"advance": DAY})
                assert answer.status_code == 200, answer.text
                await client.wait(machine.id, "stopped", from_event_id=before, timeout=WAIT)
                reports.append(await import_now())
        assert all(r.errors == [] and r.machines == 1 and r.waiting == 0 for r in reports)
        assert [len(r.imported) for r in reports] == [1] * 31  # at creation, then once a day
        assert [r.already for r in reports] == list(range(31))
        assert [r.log_lines for r in reports] == [2] * 31

        runs = sorted(store.list_runs(job="nightly", limit=None), key=lambda r: r.id)
        assert len(runs) == 31
        starts = [r.started_at for r in runs]
        assert {b - a for a, b in itertools.pairwise(starts)} == {timedelta(days=1)}  # type: ignore[operator]
        for run in runs:
            assert (run.trigger, run.state, run.exit_code) == ("native", "failed", 3)
            assert run.job_snapshot["name"] == "nightly" and run.finished_at is not None
            (attempt,) = store.get_attempts(run.id)
            assert attempt.machine_id == machine.id and attempt.outcome == "failed"
            assert attempt.submit_id.startswith(f"native:{machine.id}:")
            assert attempt.exit_code == 3 and attempt.started_at == run.started_at
            lines = sorted((line.stream, line.message) for line in store.get_logs(run.id))
            assert lines == [("stderr", "warn"), ("stdout", "tick ***")], run.id

        again = await import_now()
        assert again.imported == [] and again.already == 31 and again.errors == []
        assert len(store.list_runs(job="nightly", limit=None)) == 31
        assert "imported 0 run(s)" in sync_lines(sync_report([], [], again, dry_run=False))[-1]
    finally:
        await client.aclose()


async def test_restarts_are_attempts_of_one_run_and_recent_exits_wait(
    client: AsyncMachinesClient, store: Store
) -> None:
    job = sh("flaky", "echo try; exit 1", retries={"max_attempts": 2})
    await sync(client, [job])
    machine_id = (await schedule_machines(client))["flaky"].id

    async def two_exits() -> bool:
        machine = await client.get_machine(machine_id)
        exits = [e for e in machine.events if e.type == "exit"]
        return machine.state == "stopped" and len(exits) == 2

    await until(two_exits, "the restart to end")
    waiting = await import_runs(client, store, app=app_of(client), backend="local", settle=3600)
    assert waiting.imported == [] and waiting.waiting == 1  # its logs may still be coming
    report = await import_runs(
        client, store, app=app_of(client), backend="local", settle=0, jobs=[job]
    )
    (run,) = report.imported
    assert (run.state, run.exit_code, run.attempts, run.max_attempts) == ("failed", 1, 2, 2)
    attempts = store.get_attempts(run.id)
    assert [a.submit_id for a in attempts] == [attempts[0].submit_id, attempts[0].submit_id + ":a2"]
    assert [line.message for line in store.get_logs(run.id)] == ["try", "try"]
    assert run.job_snapshot == job.snapshot()


async def test_a_rotated_secret_stays_masked_in_the_runs_of_the_old_version(
    client: AsyncMachinesClient, store: Store
) -> None:
    job = sh("secretive", 'echo "token=$NATIVE_TOKEN"', secrets=["NATIVE_TOKEN"])
    await sync(client, [job])
    machine = await settle(client, (await schedule_machines(client))["secretive"].id)
    rotated = {"NATIVE_TOKEN": "rotated-secret-value"}
    actions = await plan_sync(client, [job], app=app_of(client), environ=rotated)
    assert [a.kind for a in actions] == ["update"]  # the spec hash covers secret values
    assert [r.status for r in await apply_sync(client, actions)] == ["done"]

    async def ran_twice() -> bool:
        current = await client.get_machine(machine.id)
        exits = [e for e in current.events if e.type == "exit"]
        return current.state == "stopped" and len(exits) == 2

    await until(ran_twice, "the updated machine's run")
    report = await import_runs(client, store, app=app_of(client), backend="local", settle=0)
    assert len(report.imported) == 2
    messages = [line.message for run in report.imported for line in store.get_logs(run.id)]
    assert messages == ["token=***", "token=***"]


def _event(kind: str, ms: int, status: str = "started", **exit_details: Any) -> MachineEvent:
    request = None
    if kind == "exit":
        request = MachineRequest(exit_event=ExitEvent(exit_code=0, **exit_details))
        status = "stopped"
    return MachineEvent(type=kind, status=status, source="flyd", timestamp=ms, request=request)


def test_native_runs_pairs_starts_with_exits() -> None:
    newest_first = [
        _event("start", 900),  # still going: not a finished run
        _event("exit", 500),
        _event("start", 500),  # a second start in the same millisecond (a fake clock)
        _event("start", 500, status="starting"),
        _event("exit", 500),
        _event("start", 500),
        _event("exit", 300),  # a restart that never came: ends the run once the machine rests
        _event("exit", 200, restarting=True),
        _event("start", 100),
        _event("exit", 50),  # its start is older than the history kept
    ]
    runs, going = native_runs("m1", newest_first, settled=False)
    assert going
    assert [(r.key, len(r.attempts)) for r in runs] == [
        ("native:m1:100", 2),
        ("native:m1:500", 1),
        ("native:m1:500.2", 1),
    ]
    assert runs[2].attempts[0][0].status == "started"  # the start, not the request

    restarting = [_event("exit", 200, restarting=True), _event("start", 100)]
    assert native_runs("m1", restarting, settled=False) == ([], True)
    runs, going = native_runs("m1", restarting, settled=True)
    assert [r.key for r in runs] == ["native:m1:100"] and not going
