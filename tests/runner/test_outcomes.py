"""Each outcome a run can have, produced by a real machine on the local backend."""

from __future__ import annotations

from jobrunner.machines import AsyncMachinesClient
from jobrunner.runner import Runner
from jobrunner.spec import RetryPolicy
from jobrunner.store import Store

from .conftest import Recorder, py_job


async def test_success_records_exit_code_machine_logs_and_transitions(
    runner: Runner, store: Store, recorder: Recorder, client: AsyncMachinesClient
) -> None:
    job = py_job("ok", "import os; print('hello from', os.environ['FLY_MACHINE_ID'])")
    run = await runner.run(job)

    assert run.state == "succeeded"
    assert run.exit_code == 0
    assert run.finished_at is not None and run.duration_s is not None
    attempts = store.get_attempts(run.id)
    assert len(attempts) == 1
    machine_id = attempts[0].machine_id
    assert machine_id and len(machine_id) == 14
    assert attempts[0].instance_id and attempts[0].outcome == "succeeded"
    # the output was captured into the ledger and streamed to the caller
    logged = [line.message for line in store.get_logs(run.id)]
    assert logged == [f"hello from {machine_id}"]
    assert recorder.lines() == logged
    # every step is a recorded transition, in order
    states = [t.to_state for t in store.transitions(run.id)]
    assert states[0] == "pending" and states[-1] == "succeeded"
    assert [s for s in states if s in ("creating", "starting", "running")] == [
        "creating",
        "starting",
        "running",
    ]
    # the machine was created the way the runner promises: ephemeral, never restarted, tagged
    machine = await client.get_machine(machine_id)
    assert machine.state == "destroyed"
    assert machine.config is not None and machine.config.auto_destroy is True
    assert machine.config.restart is not None and machine.config.restart.policy == "no"
    assert machine.config.metadata is not None
    assert machine.config.metadata["jobrunner_run_id"] == run.id
    assert machine.config.metadata["jobrunner_submit_id"] == f"{run.id}.1"
    assert machine.config.metadata["jobrunner_attempt"] == "1"
    assert machine.config.metadata["jobrunner_job"] == "ok"
    assert machine.config.metadata["jobrunner_managed"] == "true"
    # what the ledger recorded about the machine is what the API says
    assert attempts[0].instance_id == machine.instance_id
    assert attempts[0].region == machine.region


async def test_failure_records_the_jobs_exit_code(runner: Runner, store: Store) -> None:
    run = await runner.run(py_job("bad", "import sys; print('oops'); sys.exit(3)"))
    assert run.state == "failed"
    assert run.exit_code == 3
    assert [line.message for line in store.get_logs(run.id)] == ["oops"]


async def test_stderr_is_kept_apart_from_stdout(runner: Runner, store: Store) -> None:
    code = "import sys; print('out'); print('err', file=sys.stderr)"
    run = await runner.run(py_job("streams", code))
    lines = {(line.stream, line.message) for line in store.get_logs(run.id)}
    assert lines == {("stdout", "out"), ("stderr", "err")}


async def test_timeout_stops_and_destroys_the_machine(
    runner: Runner, store: Store, client: AsyncMachinesClient
) -> None:
    job = py_job("slow", "import time; print('start', flush=True); time.sleep(30)", timeout=1.0)
    job = job.model_copy(update={"stop_timeout": 1.0})
    run = await runner.run(job)
    assert run.state == "timed_out"
    assert run.duration_s is not None and run.duration_s < 15
    attempt = store.get_attempts(run.id)[0]
    assert attempt.machine_id is not None
    machine = await client.get_machine(attempt.machine_id)
    assert machine.state in ("destroyed", "destroying")
    assert "start" in [line.message for line in store.get_logs(run.id)]
    # the exit event's details are kept: the runner asked for this stop
    assert attempt.outcome == "timed_out" and attempt.requested_stop is True


async def test_oom_kill_is_its_own_outcome(runner: Runner) -> None:
    code = "x = bytearray(700 * 1024 * 1024); import time; time.sleep(5)"
    run = await runner.run(py_job("hog", code, guest={"cpus": 1, "memory_mb": 256}))
    assert run.state == "oom_killed"


async def test_retries_make_new_machines_until_attempts_run_out(
    runner: Runner, store: Store, recorder: Recorder
) -> None:
    retries = RetryPolicy(max_attempts=3, backoff=0.1, exit_codes=[4])
    run = await runner.run(py_job("flaky", "import sys; sys.exit(4)", retries=retries))
    assert run.state == "failed" and run.exit_code == 4
    attempts = store.get_attempts(run.id)
    assert [a.number for a in attempts] == [1, 2, 3]
    assert len({a.machine_id for a in attempts}) == 3
    assert [e.kind for e in recorder.events].count("retry") == 2


async def test_exit_codes_not_listed_are_not_retried(runner: Runner, store: Store) -> None:
    retries = RetryPolicy(max_attempts=3, backoff=0.1, exit_codes=[75])
    run = await runner.run(py_job("final", "import sys; sys.exit(2)", retries=retries))
    assert run.state == "failed" and run.exit_code == 2
    assert len(store.get_attempts(run.id)) == 1


async def test_a_retry_that_succeeds_ends_the_run_succeeded(
    runner: Runner, store: Store, tmp_path: object
) -> None:
    marker = f"{tmp_path}/tried"
    code = (
        "import os, sys\n"
        f"if os.path.exists({marker!r}): sys.exit(0)\n"
        f"open({marker!r}, 'w').close(); sys.exit(1)"
    )
    retries = RetryPolicy(max_attempts=2, backoff=0.1)
    run = await runner.run(py_job("second-time", code, retries=retries))
    assert run.state == "succeeded"
    assert [a.outcome for a in store.get_attempts(run.id)] == ["failed", "succeeded"]


async def test_program_that_cannot_start_fails_with_a_reason(runner: Runner) -> None:
    job = py_job("missing", "")
    job = job.model_copy(update={"cmd": ["/nonexistent/program-xyz"]})
    run = await runner.run(job)
    assert run.state == "failed"
    assert run.reason is not None and "program-xyz" in run.reason
