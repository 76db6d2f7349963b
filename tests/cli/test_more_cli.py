"""`logs --follow`, a second Ctrl-C, `gc`, and the CLI on a PostgreSQL ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from jobrunner.local.daemon import read_token, stop_server

from ..conftest import _require_postgres, fresh_postgres_database
from .conftest import REPO, Cli
from .test_run_cli import LONG_JOB, wait_until_running

TICKING_JOB = """
image = "python:3.12-slim"
cmd = ["python3", "-u", "-c", '''
import time
for i in range(3):
    print('line', i); time.sleep(0.4)
''']
"""


def test_logs_follow_prints_lines_until_the_run_ends(cli: Cli, tmp_path: Path) -> None:
    job = tmp_path / "ticking.toml"
    job.write_text(TICKING_JOB)
    run_id = cli("run", str(job), "--detach").stdout.strip()
    followed = cli("logs", "--follow", run_id, timeout=60)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.splitlines() == ["line 0", "line 1", "line 2"]
    as_json = [json.loads(x) for x in cli("logs", run_id, "--json").stdout.splitlines()]
    assert [x["message"] for x in as_json] == ["line 0", "line 1", "line 2"]
    assert {x["stream"] for x in as_json} == {"stdout"}


# A job that ignores the stop signal, so the first Ctrl-C's cancel lasts its 5 s stop grace and
# the second Ctrl-C surely comes while the run still goes.
STUBBORN_JOB = """
image = "python:3.12-slim"
cmd = [
  "python3", "-c",
  "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)",
]
stop_timeout = "5s"
"""


def test_second_ctrl_c_detaches_and_the_run_still_finishes(cli: Cli, tmp_path: Path) -> None:
    job = tmp_path / "impatient.toml"
    job.write_text(STUBBORN_JOB)
    process = cli.popen("run", str(job), "--json")
    try:
        run = wait_until_running(cli, "impatient")
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 75, stderr
    assert f"jobrunner wait {run['id']}" in stderr
    detached = json.loads(stdout)  # a script still learns which run goes on
    assert detached["id"] == run["id"] and detached["outcome"] is None
    waited = cli("wait", str(run["id"]), timeout=60)
    assert waited.returncode == 130  # the first Ctrl-C's cancel was carried out in the background
    assert cli.json("runs", "show", str(run["id"]))["outcome"] == "cancelled"


def test_gc_destroys_tagged_machines_no_run_owns(cli: Cli) -> None:
    cli("run", "hello")  # makes sure the local backend is up
    info = json.loads((cli.home / "local" / "server.json").read_text())
    headers = {"Authorization": f"Bearer {read_token(cli.home / 'local')}"}
    config = {
        "image": "python:3.12-slim",
        "init": {"cmd": ["sleep", "60"]},
        "metadata": {"jobrunner_managed": "true", "jobrunner_run_id": "deleted-run"},
    }
    created = httpx.post(
        f"{info['base_url']}/v1/apps/jobrunner-local/machines",
        json={"config": config},
        headers=headers,
    ).json()
    listed = cli.json("gc", "--dry-run")
    assert [o["machine_id"] for o in listed["orphans"]] == [created["id"]]
    assert listed["destroyed"] == []
    refused = cli("gc")  # no terminal and no --yes: nothing is destroyed
    assert "--yes" in refused.stderr
    done = cli.json("gc", "--yes")
    assert done["destroyed"] == [created["id"]]
    assert cli.json("gc", "--dry-run")["orphans"] == []


@pytest.fixture(scope="module")
def pg_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    _require_postgres()
    home = tmp_path_factory.mktemp("pg-cli-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "JOBRUNNER_"))}
    env.update({"JOBRUNNER_HOME": str(home), "JOBRUNNER_LOCAL_PORT": "0", "NO_COLOR": "1"})
    with fresh_postgres_database() as url:
        env["JOBRUNNER_DATABASE_URL"] = url.replace("postgresql+psycopg://", "postgresql://")
        try:
            yield Cli(home, env)
        finally:
            stop_server(home / "local")


@pytest.mark.postgres
def test_the_cli_on_a_postgresql_ledger(pg_cli: Cli, tmp_path: Path) -> None:
    assert pg_cli("run", "hello").returncode == 0
    assert pg_cli("run", "fail").returncode == 3
    job = tmp_path / "crashy-pg.toml"
    job.write_text(LONG_JOB.replace("time.sleep(60)", "time.sleep(4); raise SystemExit(9)"))
    process = subprocess.Popen(
        [sys.executable, "-m", "jobrunner", "run", str(job)],
        cwd=REPO,
        env=pg_cli.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_running(pg_cli, "crashy-pg")
    finally:
        process.kill()
        process.wait(10)
    reconciled = pg_cli.json("runs", "reconcile")
    assert [(r["job"], r["outcome"], r["exit_code"]) for r in reconciled] == [
        ("crashy-pg", "failed", 9)
    ]
    outcomes = {(r["job"], r["outcome"]) for r in pg_cli.json("runs", "list")}
    assert outcomes == {("hello", "succeeded"), ("fail", "failed"), ("crashy-pg", "failed")}
    assert not (pg_cli.home / "jobrunner.db").exists()  # the ledger really was PostgreSQL


def test_a_new_app_name_on_the_local_backend_just_works(cli: Cli) -> None:
    done = cli("run", "hello", "--app", "my-other-app", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["app"] == "my-other-app"


def test_logs_follow_on_a_run_nobody_drives_says_how_to_resume_it(cli: Cli) -> None:
    from jobrunner.store import Store

    with Store(f"sqlite:///{cli.home / 'jobrunner.db'}") as store:
        run = store.create_run(
            job_name="orphan",
            job_snapshot={},
            backend="local",
            app="jobrunner-local",
            region=None,
            max_attempts=1,
            timeout_s=None,
        )
    process = subprocess.Popen(
        [sys.executable, "-m", "jobrunner", "logs", "--follow", run.id],
        cwd=REPO,
        env=cli.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(4)
    finally:
        process.kill()
        _, stderr = process.communicate(timeout=10)
    assert f"jobrunner wait {run.id}" in stderr
