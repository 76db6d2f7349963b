"""Dead runs and `runs retry`, and `runs reconcile` after a driver died, through the real CLI.

The CLI runs as a subprocess on this module's local backend, with the test's own SQLite ledger.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from jobrunner.clock import Clock
from jobrunner.machines import AsyncMachinesClient
from jobrunner.queue import QueueOptions, requests_for
from jobrunner.states import TERMINAL_STATES
from jobrunner.store import SqlLedger, Store

from .conftest import APP, WAIT, Cli, running_worker, sh, until, until_sync


def dead_owner() -> str:
    """A claim owner id naming a process of this host that has exited (as a killed driver's)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return f"{socket.gethostname()}:{process.pid}:deadbeef"


async def test_a_run_that_fails_every_attempt_ends_dead_and_runs_retry_queues_it_again(
    client: AsyncMachinesClient, sqlite_store: Store, cli: Cli
) -> None:
    ledger = SqlLedger(sqlite_store)
    job = sh("flaky", "echo trying; exit 3", retries={"max_attempts": 2, "backoff": "1s"})
    [(run, _)] = await ledger.enqueue_runs(
        requests_for([(job, QueueOptions(max_attempts=2))], backend="local", app=APP)
    )

    def state() -> str:
        return sqlite_store.get_run(run.id).state

    async with running_worker(client, ledger):
        await until(lambda: state() in TERMINAL_STATES, what="the run finished")
        dead = sqlite_store.get_run(run.id)
        assert dead.state == "dead" and dead.exit_code == 3 and dead.attempts == 2, dead
        assert dead.reason is not None and "all 2 attempt(s) used" in dead.reason
        first_two = sqlite_store.get_attempts(run.id)
        assert [(a.number, a.outcome, a.exit_code) for a in first_two] == [
            (1, "failed", 3),
            (2, "failed", 3),
        ]
        # The retry waited for its backoff (1 s) after the first attempt ended.
        assert first_two[0].finished_at is not None
        assert first_two[1].created_at >= first_two[0].finished_at + timedelta(seconds=1)

        listed = cli.json("runs", "list", "--state", "dead")
        assert [(r["id"], r["state"], r["exit_code"], r["attempts"]) for r in listed] == [
            (run.id, "dead", 3, 2)
        ]
        assert cli.json("queues") == [{"queue": "default", "pending": 0, "in_flight": 0, "dead": 1}]

        retried = cli("runs", "retry", run.id)
        assert retried.returncode == 0, retried.stderr
        assert "queued again" in retried.stderr
        # The worker takes it again: two more attempts, dead again.
        await until(
            lambda: sqlite_store.get_run(run.id).attempts == 4 and state() in TERMINAL_STATES,
            what="the retried run finished",
        )

    again = sqlite_store.get_run(run.id)
    assert again.state == "dead" and again.exit_code == 3 and again.max_attempts == 4
    attempts = sqlite_store.get_attempts(run.id)
    assert [(a.number, a.outcome, a.exit_code) for a in attempts] == [
        (n, "failed", 3) for n in (1, 2, 3, 4)
    ]
    assert len({a.machine_id for a in attempts}) == 4  # a machine of its own for each attempt
    history = [t.to_state for t in sqlite_store.transitions(run.id)]
    assert history.count("dead") == 2 and history.count("pending") == 1 + 1 + 1 + 1
    assert [r.id for r in sqlite_store.list_runs(state="dead")] == [run.id]


TIMEOUT_JOB = """
image = "alpine"
cmd = ["/bin/sh", "-c", "sleep 3; exit 3"]
timeout = "6s"
"""


def test_reconcile_after_the_deadline_records_the_exit_of_a_job_that_ended_in_time(
    cli: Cli, tmp_path: Path
) -> None:
    """`jobrunner run` is SIGKILLed while its job runs; the job exits by itself (code 3) at 3 s
    of a 6 s timeout; `runs reconcile` at about 9 s records `failed` with code 3, not a timeout."""
    job = tmp_path / "punctual.toml"
    job.write_text(TIMEOUT_JOB)
    driver = cli.popen("run", str(job), name="driver")
    with Store(cli.database_url) as store:
        try:

            def running() -> bool:
                assert driver.poll() is None, (cli.logs / "driver.err").read_text()
                runs = store.list_runs(job="punctual", limit=1)
                return bool(runs) and runs[0].state == "running"

            until_sync(running, timeout=WAIT, interval=0.05, what="the run running")
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=10)
        [run] = store.list_runs(job="punctual")
        [attempt] = store.get_attempts(run.id)
        assert attempt.started_at is not None and attempt.machine_id is not None
        past_deadline = attempt.started_at + timedelta(seconds=9)
        until_sync(lambda: datetime.now(UTC) >= past_deadline, timeout=30, what="t = 9 s")
        assert store.get_run(run.id).state == "running"  # nobody recorded anything meanwhile

        reconciled = cli.json("runs", "reconcile")
        [mine] = [r for r in reconciled if r["id"] == run.id]
        assert (mine["outcome"], mine["exit_code"]) == ("failed", 3), mine
        history = [t.to_state for t in store.transitions(run.id)]
        assert history.count("failed") == 1 and "timed_out" not in history
        [final] = store.get_attempts(run.id)
        assert (final.outcome, final.exit_code, final.machine_id) == (
            "failed",
            3,
            attempt.machine_id,
        )


class AnHourAgo(Clock):
    def time(self) -> float:
        return time.time() - 3600


def test_reconcile_resumes_an_attempt_whose_machine_was_never_created(cli: Cli) -> None:
    """A driver died after committing attempt 1 (an hour ago) and before creating its machine:
    reconcile creates the machine and the job gets its whole timeout, counted from its start."""
    job = sh("late", "sleep 2; echo done", timeout="5s")
    # A Store whose clock is an hour behind writes the rows as the dead driver did then.
    with Store(cli.database_url, clock=AnHourAgo()) as then:
        run = then.create_run(
            job_name=job.name,
            job_snapshot=job.snapshot(),
            backend="local",
            app=APP,
            region=None,
            max_attempts=1,
            timeout_s=job.timeout,
            trigger="cli",
            owner=dead_owner(),
        )
        attempt = then.create_attempt(run.id, 1, submit_id=f"{run.id}.1", region=None)
        assert then.transition_run(run.id, "creating", reason="creating machine", attempt_number=1)
    assert attempt.created_at < datetime.now(UTC) - timedelta(minutes=59)

    reconciled = cli.json("runs", "reconcile")
    [mine] = [r for r in reconciled if r["id"] == run.id]
    assert mine["outcome"] == "succeeded", mine
    with Store(cli.database_url) as store:
        [resumed] = store.get_attempts(run.id)
        assert resumed.machine_id is not None and resumed.outcome == "succeeded"
        assert resumed.started_at is not None and resumed.finished_at is not None
        assert resumed.finished_at - resumed.started_at >= timedelta(seconds=1.5)
        assert [line.message for line in store.get_logs(run.id)] == ["done"]


def leave_bad_and_healthy_runs(store: Store) -> tuple[list[str], str]:
    """Two runs whose stored job has an env value that is not UTF-8 (a lone surrogate, which the
    JSON column keeps), and one healthy run, all left unfinished by a driver that died."""
    owner = dead_owner()
    common = {"backend": "local", "app": APP, "region": None, "max_attempts": 1, "owner": owner}
    bad_ids = []
    for n in range(2):
        snapshot = sh(f"broken-{n}", "echo never").snapshot()
        snapshot["env"] = {"BROKEN": f"value-{n}-\udcff"}
        run = store.create_run(
            job_name=f"broken-{n}", job_snapshot=snapshot, timeout_s=None, **common
        )
        assert run.job_snapshot["env"]["BROKEN"].endswith("\udcff")
        bad_ids.append(run.id)
    good = sh("healthy", "echo fine")
    healthy = store.create_run(
        job_name="healthy", job_snapshot=good.snapshot(), timeout_s=None, **common
    )
    return bad_ids, healthy.id


def test_reconcile_finishes_the_healthy_run_and_names_each_bad_one(
    cli: Cli, sqlite_store: Store
) -> None:
    bad_ids, healthy = leave_bad_and_healthy_runs(sqlite_store)

    done = cli("runs", "reconcile", "--json")
    assert done.returncode == 74, done.stderr  # BACKEND_ERROR: some runs could not be finished
    results = {r["id"]: r for r in json.loads(done.stdout)}
    assert results[healthy]["outcome"] == "succeeded"
    assert sqlite_store.get_run(healthy).state == "succeeded"
    for run_id in bad_ids:
        # Each bad run is named, with its own error, and ended (not left to fail every time).
        said = f"run {run_id} ended create_failed"
        [line] = [ln for ln in done.stderr.splitlines() if said in ln]
        assert "env.BROKEN" in line and "UTF-8" in line
        assert sqlite_store.get_run(run_id).owner is None  # not left claimed


def test_reconcile_records_each_run_whose_job_cannot_become_a_machine_as_create_failed(
    cli: Cli, sqlite_store: Store
) -> None:
    bad_ids, healthy = leave_bad_and_healthy_runs(sqlite_store)
    cli("runs", "reconcile", "--json")
    assert sqlite_store.get_run(healthy).state == "succeeded"
    for run_id in bad_ids:
        bad = sqlite_store.get_run(run_id)
        assert bad.state == "create_failed", bad.state
        assert bad.reason is not None and "UTF-8" in bad.reason
