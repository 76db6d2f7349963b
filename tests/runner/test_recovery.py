"""Crash safety, cancellation, exactly-once outcomes, orphans and secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from jobrunner.machines import AsyncMachinesClient
from jobrunner.machines.errors import InsufficientCapacity, NotFound
from jobrunner.machines.models import Machine
from jobrunner.runner import RunBusy, Runner
from jobrunner.store import Store

from .conftest import PY, Recorder, make_runner, py_job

LONG = "import time; print('working', flush=True); time.sleep(60)"


async def wait_for_state(store: Store, run_id: str, state: str, timeout: float = 15.0) -> None:
    with anyio.fail_after(timeout):
        while store.get_run(run_id).state != state:
            await anyio.sleep(0.05)


async def test_resume_adopts_a_machine_created_before_a_crash(
    runner: Runner, store: Store, client: AsyncMachinesClient
) -> None:
    """A driver died after sending the create, before saving the machine id: no 2nd machine."""
    run = await runner.submit(py_job("adopt", "print('adopted')"))
    submit_id = f"{run.id}.1"
    store.create_attempt(run.id, 1, submit_id=submit_id, region=None)
    created = await client.create_machine(
        {
            "image": "python:3.12-slim",
            "init": {"cmd": [PY, "-c", "print('adopted')"]},
            "auto_destroy": True,
            "restart": {"policy": "no"},
            "metadata": {"jobrunner_submit_id": submit_id, "jobrunner_run_id": run.id},
        }
    )

    finished = await runner.drive(run.id)
    await runner.logs_settled(run.id)

    assert finished.state == "succeeded"
    attempts = store.get_attempts(run.id)
    assert len(attempts) == 1 and attempts[0].machine_id == created.id
    tagged = await client.list_machines(include_deleted=True, metadata={"jobrunner_run_id": run.id})
    assert [m.id for m in tagged] == [created.id]
    assert [line.message for line in store.get_logs(run.id)] == ["adopted"]


async def test_a_second_driver_resumes_a_run_whose_driver_went_away(
    client: AsyncMachinesClient, store: Store
) -> None:
    first = make_runner(client, store)
    code = "import time; print('a', flush=True); time.sleep(1.5); print('b'); raise SystemExit(5)"
    run = await first.submit(py_job("resume", code))
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.drive, run.id)
        await wait_for_state(store, run.id, "starting")
        tg.cancel_scope.cancel()  # the first driver stops watching mid-run

    second = make_runner(client, store)
    finished = await second.drive(run.id)
    await second.logs_settled(run.id)  # the outcome is recorded before the last lines

    assert finished.state == "failed" and finished.exit_code == 5
    assert len(store.get_attempts(run.id)) == 1
    terminal = [t for t in store.transitions(run.id) if t.to_state == "failed"]
    assert len(terminal) == 1
    assert [line.message for line in store.get_logs(run.id)] == ["a", "b"]


async def test_cancel_from_another_runner_stops_the_machine(
    client: AsyncMachinesClient, store: Store
) -> None:
    driver = make_runner(client, store)
    canceller = make_runner(client, store)
    run = await driver.submit(py_job("long", LONG))
    async with anyio.create_task_group() as tg:
        tg.start_soon(driver.drive, run.id)
        await wait_for_state(store, run.id, "running")
        await canceller.cancel(run.id)
        await wait_for_state(store, run.id, "cancelled")
    attempt = store.get_attempts(run.id)[0]
    assert attempt.machine_id is not None
    machine = await client.get_machine(attempt.machine_id)
    assert machine.state in ("destroyed", "destroying")
    finished = store.get_run(run.id)
    assert finished.duration_s is not None and finished.duration_s < 20


async def test_cancel_of_a_run_nobody_drives_finishes_it_without_a_machine(
    runner: Runner, store: Store
) -> None:
    run = await runner.submit(py_job("never", LONG))
    finished = await runner.cancel(run.id)
    assert finished.state == "cancelled"
    assert store.get_attempts(run.id) == []


async def test_two_drivers_cannot_drive_one_run(client: AsyncMachinesClient, store: Store) -> None:
    first = make_runner(client, store)
    second = make_runner(client, store)
    run = await first.submit(py_job("once", "import time; time.sleep(2)"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.drive, run.id)
        await wait_for_state(store, run.id, "starting")
        with pytest.raises(RunBusy):
            await second.drive(run.id)
    assert store.get_run(run.id).state == "succeeded"
    assert sum(t.to_state == "succeeded" for t in store.transitions(run.id)) == 1


async def test_machine_that_vanishes_without_exit_event_is_lost(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_get = runner.client.get_machine

    async def vanished(machine_id: str, **kw: Any) -> Machine:
        machine = await real_get(machine_id, **kw)
        if machine.state in ("destroyed", "stopped"):
            raise NotFound(status_code=404, method="GET", path=f"/machines/{machine_id}")
        return machine

    monkeypatch.setattr(runner.client, "get_machine", vanished)
    run = await runner.run(py_job("ghost", "print(1)"))
    assert run.state == "lost"
    assert run.reason is not None and "without an exit event" in run.reason


async def test_capacity_errors_fall_back_to_the_next_region(
    runner: Runner, recorder: Recorder, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_create = runner.client.create_machine

    async def no_room_in_ord(config: Any, *, region: str | None = None, **kw: Any) -> Machine:
        if region == "ord":
            raise InsufficientCapacity(
                status_code=503, method="POST", path="/machines", error="out of capacity"
            )
        return await real_create(config, region=region, **kw)

    monkeypatch.setattr(runner.client, "create_machine", no_room_in_ord)
    job = py_job("roam", "print('ok')", region="ord", fallback_regions=["iad"])
    run = await runner.run(job)
    assert run.state == "succeeded"
    assert store.get_attempts(run.id)[0].region == "iad"
    assert any("no capacity in ord" in e.message for e in recorder.events)


async def test_refused_create_is_create_failed_with_the_apis_reason(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(config: Any, **kw: Any) -> Machine:
        raise InsufficientCapacity(
            status_code=503, method="POST", path="/machines", error="out of capacity"
        )

    monkeypatch.setattr(runner.client, "create_machine", refuse)
    run = await runner.run(py_job("nowhere", "print(1)"))
    assert run.state == "create_failed"
    assert run.reason is not None and "out of capacity" in run.reason


async def test_orphaned_tagged_machines_are_found_and_live_ones_are_not(
    client: AsyncMachinesClient, store: Store
) -> None:
    runner = make_runner(client, store)
    orphan = await client.create_machine(
        {
            "image": "python:3.12-slim",
            "init": {"cmd": [PY, "-c", "import time; time.sleep(60)"]},
            "metadata": {"jobrunner_managed": "true", "jobrunner_run_id": "gone"},
        }
    )
    run = await runner.submit(py_job("live", LONG))
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.drive, run.id)
        await wait_for_state(store, run.id, "running")
        orphans = {m.id for m in await runner.orphan_machines()}
        live_machine = store.get_attempts(run.id)[0].machine_id
        assert orphan.id in orphans
        assert live_machine not in orphans
        await runner.destroy_machine(orphan.id)
        await runner.cancel(run.id)
    assert orphan.id not in {m.id for m in await runner.orphan_machines()}


async def test_secret_values_reach_the_job_but_never_the_ledger(
    client: AsyncMachinesClient, store: Store, database_url: str
) -> None:
    secret = "s3cr3t-Value-9f8e7d"
    runner = make_runner(client, store, environ={"API_KEY": secret})
    code = "import os; print('secret length', len(os.environ['API_KEY']))"
    run = await runner.run(py_job("secretive", code, secrets=["API_KEY"]))
    assert run.state == "succeeded"
    assert [line.message for line in store.get_logs(run.id)] == [f"secret length {len(secret)}"]
    assert secret not in repr(store.get_run(run.id).job_snapshot)
    assert "API_KEY" in repr(store.get_run(run.id).job_snapshot)
    if database_url.startswith("sqlite:///"):
        store.close()
        raw = b"".join(p.read_bytes() for p in Path(database_url[10:]).parent.glob("store.db*"))
        assert secret.encode() not in raw
