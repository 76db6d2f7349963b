"""The edges of a run's life: long output, masked secrets, cancels met by a resumed driver, API
failures at each step, ambiguous creates, retries after capacity errors, gc and other apps."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from jobrunner.machines import AsyncMachinesClient
from jobrunner.machines.errors import (
    InsufficientCapacity,
    MachinesConnectionError,
    NotFound,
    RateLimited,
    ServerError,
    WaitTimeout,
)
from jobrunner.machines.models import Machine
from jobrunner.runner import Runner, WrongBackend
from jobrunner.spec import RetryPolicy
from jobrunner.store import Store

from .conftest import APP, PY, Recorder, make_runner, py_job

LONG = "import time; print('working', flush=True); time.sleep(60)"


def no_answer(method: str = "GET") -> MachinesConnectionError:
    return MachinesConnectionError(
        method=method,
        path="/v1/apps/x/machines",
        host="127.0.0.1",
        reason="ConnectError",
        request_sent=False,
        retryable=True,
    )


async def machines_of(client: AsyncMachinesClient, run_id: str) -> list[Machine]:
    return await client.list_machines(include_deleted=True, metadata={"jobrunner_run_id": run_id})


async def test_every_line_of_a_chatty_job_is_kept_and_streamed_once(
    runner: Runner, store: Store, recorder: Recorder
) -> None:
    # More than one page (100 lines) is printed before the first poll can come: an empty start
    # token would have returned only the newest 100 of them.
    run = await runner.run(py_job("chatty", "for i in range(1000): print('line', i)"))
    assert run.state == "succeeded"
    expected = [f"line {i}" for i in range(1000)]
    assert [line.message for line in store.get_logs(run.id)] == expected
    assert recorder.lines() == expected


async def test_secret_values_are_masked_in_stored_and_streamed_output(
    client: AsyncMachinesClient, store: Store, recorder: Recorder
) -> None:
    secret = "s3cr3t-Value-9f8e7d"
    runner = make_runner(client, store, recorder, environ={"API_KEY": secret})
    code = "import os; print('the key is', os.environ['API_KEY'])"
    run = await runner.run(py_job("leaky", code, secrets=["API_KEY"]))
    assert run.state == "succeeded"
    assert [line.message for line in store.get_logs(run.id)] == ["the key is ***"]
    assert recorder.lines() == ["the key is ***"]


async def test_a_cancelled_run_says_it_was_cancelled_by_the_user(
    runner: Runner, store: Store
) -> None:
    run = await runner.submit(py_job("stopme", LONG))
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.drive, run.id)
        with anyio.fail_after(15):
            while store.get_run(run.id).state != "running":
                await anyio.sleep(0.05)
        await runner.cancel(run.id)
    finished = store.get_run(run.id)
    assert finished.state == "cancelled"
    assert finished.reason == "cancelled by the user"


async def test_a_resumed_driver_records_a_cancel_its_predecessor_carried_out(
    runner: Runner, store: Store, client: AsyncMachinesClient
) -> None:
    """The first driver stopped the machine for a cancel, then died before recording it: the
    job's exit (here 130, from the stop signal) must be recorded as the cancel it was."""
    run = await runner.submit(py_job("halfcancelled", LONG))
    attempt = store.create_attempt(run.id, 1, submit_id=f"{run.id}.1", region=None)
    machine = await client.create_machine(
        {
            "image": "python:3.12-slim",
            "init": {"cmd": [PY, "-c", "raise SystemExit(130)"]},
            "auto_destroy": True,
            "restart": {"policy": "no"},
            "metadata": {"jobrunner_submit_id": attempt.submit_id, "jobrunner_run_id": run.id},
        }
    )
    store.update_attempt(run.id, 1, machine_id=machine.id, instance_id=machine.instance_id)
    store.request_cancel(run.id)
    await client.wait(machine.id, "destroyed", timeout=30)

    finished = await runner.drive(run.id)
    await runner.logs_settled(run.id)

    assert finished.state == "cancelled"
    assert store.get_attempts(run.id)[0].outcome == "cancelled"


async def test_a_resumed_driver_stops_a_cancelled_runs_machine(
    runner: Runner, store: Store, client: AsyncMachinesClient
) -> None:
    run = await runner.submit(py_job("stillrunning", LONG))
    attempt = store.create_attempt(run.id, 1, submit_id=f"{run.id}.1", region=None)
    machine = await client.create_machine(
        {
            "image": "python:3.12-slim",
            "init": {"cmd": [PY, "-c", LONG]},
            "auto_destroy": True,
            "restart": {"policy": "no"},
            "metadata": {"jobrunner_submit_id": attempt.submit_id, "jobrunner_run_id": run.id},
        }
    )
    store.update_attempt(run.id, 1, machine_id=machine.id, instance_id=machine.instance_id)
    store.request_cancel(run.id)

    started = time.monotonic()
    finished = await runner.drive(run.id)
    await runner.logs_settled(run.id)

    assert finished.state == "cancelled"
    assert time.monotonic() - started < 20  # not the job's 60 s
    assert (await client.get_machine(machine.id)).state in ("destroyed", "destroying")


async def test_a_cancel_before_the_machine_exists_creates_no_machine(
    runner: Runner, store: Store, client: AsyncMachinesClient
) -> None:
    """The first driver died after recording the attempt, before creating its machine."""
    run = await runner.submit(py_job("neverstarted", LONG))
    store.create_attempt(run.id, 1, submit_id=f"{run.id}.1", region=None)
    store.request_cancel(run.id)

    finished = await runner.drive(run.id)
    await runner.logs_settled(run.id)

    assert finished.state == "cancelled"
    assert await machines_of(client, run.id) == []


async def test_a_machine_gone_before_it_was_seen_starting_is_lost_not_an_error(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def gone(machine_id: str, *args: Any, **kw: Any) -> Machine:
        raise NotFound(status_code=404, method="GET", path=f"/machines/{machine_id}")

    monkeypatch.setattr(runner.client, "wait", gone)
    monkeypatch.setattr(runner.client, "get_machine", gone)
    run = await runner.run(py_job("vanishing", "print(1)"))
    assert run.state == "lost"
    assert run.reason is not None and "vanished" in run.reason


async def test_an_ambiguous_create_failure_adopts_the_machine_it_made(
    runner: Runner, client: AsyncMachinesClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_create = runner.client.create_machine

    async def made_but_answered_500(config: Any, **kw: Any) -> Machine:
        await real_create(config, **kw)
        raise ServerError(status_code=500, method="POST", path="/machines", error="oops")

    monkeypatch.setattr(runner.client, "create_machine", made_but_answered_500)
    run = await runner.run(py_job("ambiguous", "print('ran once')"))
    assert run.state == "succeeded"
    assert len(await machines_of(client, run.id)) == 1
    assert [line.message for line in store.get_logs(run.id)] == ["ran once"]


async def test_a_capacity_failure_is_retried_after_the_backoff(
    runner: Runner, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_create = runner.client.create_machine
    calls = 0

    async def full_once(config: Any, **kw: Any) -> Machine:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise InsufficientCapacity(
                status_code=503, method="POST", path="/machines", error="out of capacity"
            )
        return await real_create(config, **kw)

    monkeypatch.setattr(runner.client, "create_machine", full_once)
    retries = RetryPolicy(max_attempts=2, backoff=0.5)
    run = await runner.run(py_job("patient", "print('ok')", retries=retries))

    assert run.state == "succeeded"
    first, second = store.get_attempts(run.id)
    assert first.outcome == "create_failed" and first.machine_id is None
    assert second.outcome == "succeeded"
    assert first.finished_at is not None
    assert (second.created_at - first.finished_at).total_seconds() >= 0.5


async def test_other_create_errors_are_not_retried(
    runner: Runner, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(config: Any, **kw: Any) -> Machine:
        raise ServerError(status_code=400, method="POST", path="/machines", error="bad image")

    monkeypatch.setattr(runner.client, "create_machine", refuse)
    retries = RetryPolicy(max_attempts=3, backoff=0.1)
    run = await runner.run(py_job("invalid", "print(1)", retries=retries))
    assert run.state == "create_failed" and run.reason is not None and "bad image" in run.reason
    assert len(store.get_attempts(run.id)) == 1


async def test_an_api_outage_raises_the_error_itself_and_leaves_the_run_resumable(
    client: AsyncMachinesClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_runner(client, store)
    run = await first.submit(py_job("outage", "print('survived')"))

    async def down(*args: Any, **kw: Any) -> Any:
        raise no_answer()

    monkeypatch.setattr(first.client, "wait", down)
    with pytest.raises(MachinesConnectionError):  # not an ExceptionGroup
        await first.drive(run.id)
    monkeypatch.undo()

    left = store.get_run(run.id)
    assert left.finished_at is None and left.owner is None  # unfinished, claim released
    resumer = make_runner(client, store)
    finished = await resumer.drive(run.id)
    await resumer.logs_settled(run.id)  # the outcome is recorded before the last lines
    assert finished.state == "succeeded"
    assert len(store.get_attempts(run.id)) == 1  # the same machine, adopted
    assert [line.message for line in store.get_logs(run.id)] == ["survived"]


async def test_reconcile_finishes_the_other_runs_when_one_cannot_be_finished(
    client: AsyncMachinesClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = make_runner(client, store)
    # Recorded but never driven, as if the process that submitted them had died.
    good = await runner.submit(py_job("fine", "print(1)"), claim=False)
    bad = await runner.submit(py_job("unlucky", "print(2)"), claim=False)
    real_create = runner.client.create_machine

    async def create(config: Any, **kw: Any) -> Machine:
        if config.metadata["jobrunner_job"] == "unlucky":
            raise no_answer("POST")
        return await real_create(config, **kw)

    monkeypatch.setattr(runner.client, "create_machine", create)
    report = await runner.reconcile()
    results = {r.id: r for r in report.runs}
    assert results[good.id].state == "succeeded"
    assert results[bad.id].finished_at is None
    assert bad.id in report.errors  # said, with its own error, and the command exits non-zero


async def test_gc_spares_a_machine_whose_tag_names_a_live_run(
    runner: Runner, store: Store, client: AsyncMachinesClient
) -> None:
    """A driver that died between the create and recording the machine id left only the tag."""
    run = await runner.submit(py_job("unrecorded", LONG))
    machine = await client.create_machine(
        {
            "image": "python:3.12-slim",
            "init": {"cmd": [PY, "-c", LONG]},
            "metadata": {"jobrunner_managed": "true", "jobrunner_run_id": run.id},
        }
    )
    try:
        assert machine.id not in {m.id for m in await runner.orphan_machines()}
        store.finish_run(run.id, "cancelled", reason="test")
        assert machine.id in {m.id for m in await runner.orphan_machines()}
    finally:
        await runner.destroy_machine(machine.id)


async def test_a_job_in_another_app_has_its_logs_copied(
    runner: Runner, store: Store, client: AsyncMachinesClient
) -> None:
    other = "jobrunner-other-app"
    try:
        await client.get_app(other)
    except NotFound:
        await client.create_app(other)
    run = await runner.run(py_job("elsewhere", "print('from the other app')", app=other))
    assert run.state == "succeeded" and run.app == other
    assert [line.message for line in store.get_logs(run.id)] == ["from the other app"]
    machine_id = store.get_attempts(run.id)[0].machine_id
    assert machine_id is not None
    with pytest.raises(NotFound):  # it really ran in the other app, not in the runner's own
        await client.get_machine(machine_id, app=APP)


async def test_a_slow_start_is_reported_while_it_lasts(
    runner: Runner, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_wait, real_get = runner.client.wait, runner.client.get_machine
    timeouts = 0

    async def slow_to_start(machine: Any, state: Any = "started", **kw: Any) -> None:
        nonlocal timeouts
        if timeouts < 2:  # as if a large image were still being pulled
            timeouts += 1
            raise WaitTimeout(status_code=408, method="GET", path="/wait")
        await real_wait(machine, state, **kw)

    async def not_started_yet(machine_id: str, **kw: Any) -> Machine:
        machine = await real_get(machine_id, **kw)
        if timeouts <= 2 and machine.state not in {"stopped", "destroyed"}:
            return machine.model_copy(
                update={
                    "state": "created",
                    "events": [e for e in machine.events if e.type != "start"],
                }
            )
        return machine

    monkeypatch.setattr(runner.client, "wait", slow_to_start)
    monkeypatch.setattr(runner.client, "get_machine", not_started_yet)
    run = await runner.run(py_job("slowstart", "import time; time.sleep(1); print('up')"))
    assert run.state == "succeeded"
    notices = [e.message for e in recorder.events if e.kind == "notice"]
    assert len([n for n in notices if "is still starting" in n]) == 2, notices


async def test_a_run_of_another_backend_is_not_driven_here(runner: Runner, store: Store) -> None:
    run = store.create_run(
        job_name="elsewhere",
        job_snapshot=py_job("elsewhere", "print(1)").snapshot(),
        backend="fly",
        app="jobs-app",
        region=None,
        max_attempts=1,
        timeout_s=None,
    )
    with pytest.raises(WrongBackend, match="--backend fly"):
        await runner.drive(run.id)
    assert (await runner.reconcile()).runs == []  # not picked up either
    assert store.get_attempts(run.id) == []


async def test_a_resumed_attempt_never_adopts_a_machine_without_its_submit_id(
    runner: Runner, store: Store, client: AsyncMachinesClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger = await client.create_machine(
        {
            "image": "python:3.12-slim",
            "init": {"cmd": [PY, "-c", "print('not yours')"]},
            "metadata": {"owner": "someone else"},
        }
    )
    run = await runner.submit(py_job("careful", "print('mine')"))
    store.create_attempt(run.id, 1, submit_id=f"{run.id}.1", region=None)
    real_list = runner.client.list_machines

    async def filter_ignored(**kw: Any) -> list[Machine]:
        kw.pop("metadata", None)  # a server that ignores metadata.* filters
        return await real_list(**kw)

    monkeypatch.setattr(runner.client, "list_machines", filter_ignored)
    finished = await runner.drive(run.id)
    await runner.logs_settled(run.id)
    assert finished.state == "succeeded"
    assert store.get_attempts(run.id)[0].machine_id != stranger.id
    assert [line.message for line in store.get_logs(run.id)] == ["mine"]


@pytest.mark.parametrize("status", [429, 503])
async def test_a_create_refused_for_load_leaves_the_run_for_the_next_driver(
    runner: Runner,
    client: AsyncMachinesClient,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
) -> None:
    """429/502/503/504 after the client's retries say the API is busy, not that the job is
    wrong: the run must not end create_failed; the next driver creates its one machine."""
    real_create = runner.client.create_machine
    error = RateLimited if status == 429 else ServerError

    async def busy(config: Any, **kw: Any) -> Machine:
        raise error(status_code=status, method="POST", path="/machines", error="busy")

    monkeypatch.setattr(runner.client, "create_machine", busy)
    run = await runner.submit(py_job(f"busy{status}", "print('ran after all')"))
    with pytest.raises(error):
        await runner.drive(run.id)
    assert store.get_run(run.id).state not in Store.TERMINAL_STATES
    monkeypatch.setattr(runner.client, "create_machine", real_create)
    finished = await runner.drive(run.id)
    assert finished.state == "succeeded"
    assert len(await machines_of(client, run.id)) == 1
