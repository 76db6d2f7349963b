"""`jobrunner run` and the ledger commands, end to end on the local backend."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from jobrunner.store import Store

from .conftest import Cli

SLOW_JOB = """
image = "python:3.12-slim"
cmd = ["python3", "-c", '''
import time
print('tick', flush=True)
time.sleep(3)
print('done')
raise SystemExit(7)
''']
"""

LONG_JOB = """
image = "python:3.12-slim"
cmd = ["python3", "-c", "import time; print('long', flush=True); time.sleep(60)"]
"""


def wait_until_running(cli: Cli, job: str, timeout: float = 30.0) -> dict[str, object]:
    """Poll the ledger directly (a CLI call costs a second or more) until ``job`` is running."""
    url = cli.env.get("JOBRUNNER_DATABASE_URL") or f"sqlite:///{cli.home / 'jobrunner.db'}"
    deadline = time.monotonic() + timeout
    with Store(url) as store:
        while time.monotonic() < deadline:
            runs = store.list_runs(job=job, limit=1)
            if runs and runs[0].state == "running":
                return {"id": runs[0].id, "state": runs[0].state}
            time.sleep(0.05)
    raise AssertionError(f"no running run of {job}: {runs}")


def test_hello_and_fail_examples_and_the_ledger(cli: Cli) -> None:
    hello = cli("run", "jobs/hello.toml")
    assert hello.returncode == 0, hello.stderr
    assert "Hello" in hello.stdout

    fail = cli("run", "jobs/fail.toml")
    assert fail.returncode == 3, fail.stderr

    runs = {r["job"]: r for r in cli.json("runs", "list")}
    assert runs["hello"]["outcome"] == "succeeded" and runs["hello"]["exit_code"] == 0
    assert runs["fail"]["outcome"] == "failed" and runs["fail"]["exit_code"] == 3
    for r in runs.values():
        assert isinstance(r["machine_id"], str) and len(r["machine_id"]) == 14
        assert isinstance(r["duration_s"], float) and r["duration_s"] > 0

    logs = cli("logs", runs["hello"]["id"])
    assert logs.returncode == 0 and "Hello" in logs.stdout
    filtered = cli.json("runs", "list", "--job", "fail", "--state", "failed", "--limit", "1")
    assert [r["id"] for r in filtered] == [runs["fail"]["id"]]
    shown = cli.json("runs", "show", runs["fail"]["id"][:8])
    assert shown["id"] == runs["fail"]["id"]
    assert [t["to"] for t in shown["transitions"]][-1] == "failed"


def test_run_json_prints_the_finished_run(cli: Cli) -> None:
    done = cli("run", "hello", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["job"] == "hello" and data["outcome"] == "succeeded"


def test_env_and_timeout_overrides(cli: Cli, tmp_path: Path) -> None:
    job = tmp_path / "echo.toml"
    job.write_text(
        'image = "python:3.12-slim"\n'
        'cmd = ["python3", "-c", "import os; print(\'color\', os.environ[\'COLOR\'])"]\n'
    )
    done = cli("run", str(job), "--env", "COLOR=blue")
    assert done.returncode == 0, done.stderr
    assert "color blue" in done.stdout

    slow = tmp_path / "slow.toml"
    slow.write_text(LONG_JOB)
    timed = cli("run", str(slow), "--timeout", "1s")
    assert timed.returncode == 124, timed.stderr
    assert "timed_out in 1" in timed.stderr and "exceeded its timeout" in timed.stderr


def test_sigkill_mid_run_then_reconcile_records_the_outcome(cli: Cli, tmp_path: Path) -> None:
    job = tmp_path / "crashy.toml"
    job.write_text(SLOW_JOB)
    process = cli.popen("run", str(job))
    try:
        run = wait_until_running(cli, "crashy")
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=10)

    reconciled = cli.json("runs", "reconcile")
    mine = [r for r in reconciled if r["id"] == run["id"]]
    assert mine and mine[0]["outcome"] == "failed" and mine[0]["exit_code"] == 7
    shown = cli.json("runs", "show", str(run["id"]))
    assert shown["attempts"] == 1
    assert sum(t["to"] == "failed" for t in shown["transitions"]) == 1
    logs = cli("logs", str(run["id"]))
    assert logs.stdout.split() == ["tick", "done"]
    # a second reconcile finds nothing left to do
    assert cli.json("runs", "reconcile") == []


def test_ctrl_c_cancels_the_run(cli: Cli, tmp_path: Path) -> None:
    job = tmp_path / "interrupted.toml"
    job.write_text(LONG_JOB)
    process = cli.popen("run", str(job))
    try:
        run = wait_until_running(cli, "interrupted")
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert cli.json("runs", "show", str(run["id"]))["outcome"] == "cancelled"


def test_detach_then_wait_reports_the_jobs_exit_code(cli: Cli) -> None:
    started = cli("run", "fail", "--detach")
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    waited = cli("wait", run_id)
    assert waited.returncode == 3, waited.stderr
    assert cli.json("runs", "show", run_id)["outcome"] == "failed"


def test_cancel_command_stops_a_detached_run(cli: Cli, tmp_path: Path) -> None:
    job = tmp_path / "background.toml"
    job.write_text(LONG_JOB)
    run_id = cli("run", str(job), "--detach").stdout.strip()
    wait_until_running(cli, "background")
    done = cli("cancel", run_id)
    assert done.returncode == 0, done.stderr
    assert cli.json("runs", "show", run_id)["outcome"] == "cancelled"


def test_invalid_job_file_is_reported_with_file_key_and_fix(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('image = "x"\ncmd = ["true"]\ntimeout = "ten minutes"\nregoin = "ord"\n')
    done = cli("run", str(bad))
    assert done.returncode == 65
    assert "bad.toml" in done.stderr and "timeout" in done.stderr
    assert "region" in done.stderr  # the did-you-mean for the misspelt key
    assert "Traceback" not in done.stderr

    checked = cli("jobs", "validate", str(bad), "--json")
    assert checked.returncode == 65
    assert json.loads(checked.stdout)[0]["valid"] is False


def test_unknown_job_name_and_run_id_are_clear_errors(cli: Cli) -> None:
    missing = cli("run", "no-such-job")
    assert missing.returncode == 65 and "no-such-job" in missing.stderr
    unknown = cli("runs", "show", "ZZZZZZZZZZ")
    assert unknown.returncode == 2 and "ZZZZZZZZZZ" in unknown.stderr  # a bad RUN argument
    assert "Traceback" not in unknown.stderr


def test_jobs_list_shows_the_shipped_examples(cli: Cli) -> None:
    done = cli("jobs", "list", "--json", extra_env={"HELLO_TOKEN": "x"})
    names = {j["name"] for j in json.loads(done.stdout)["jobs"]}
    assert {"hello", "fail", "timeout"} <= names


def test_a_job_with_only_an_image_runs_the_images_own_command(cli: Cli, tmp_path: Path) -> None:
    known = tmp_path / "shell.toml"
    known.write_text('image = "busybox:1.36"\n')  # the catalog: busybox runs `sh`
    done = cli("run", str(known), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["exit_code"] == 0
    unknown = tmp_path / "mystery.toml"
    unknown.write_text('image = "registry.example.com/team/tool:3"\n')
    failed = cli("run", str(unknown))
    # Starts and fails as a broken image would (the job's exit code is the command's), and
    # its output says what to configure.
    assert failed.returncode == 127, failed.stderr
    assert "no command to run" in failed.stderr and "images.toml" in failed.stderr
