"""What a user of the CLI notices: quick read commands, messages that say what happened and why,
plain output in pipes and with NO_COLOR, the right exit codes, shell completion."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from jobrunner.cli import exitcodes
from jobrunner.local.daemon import read_token

from .conftest import REPO, Cli, isolated_cli

CLI_DOC = (REPO / "docs" / "cli.md").read_text()


def _job(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(f'image = "python:3.12-slim"\n{body}')
    return path


def _imported(cli: Cli, *args: str) -> set[str]:
    """The modules ``jobrunner ARGS`` imports (from ``python -X importtime``)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "jobrunner", *args],
        cwd=REPO,
        env=cli.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def _on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 90.0) -> str:
    """Run ``jobrunner ARGS`` with stdout and stderr on a pseudo-terminal; what it showed."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "jobrunner", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal closed with the process
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    return shown.decode(errors="replace")


# ---- start-up: the read commands import only what reading needs ---------------------------

HEAVY = {"jobrunner.runner", "jobrunner.session", "httpx", "aiohttp", "pydantic", "sqlmodel"}


def test_read_commands_do_not_import_the_runner_the_client_or_pydantic(cli: Cli) -> None:
    run = cli.json("run", "hello")
    for args in (["runs", "list"], ["runs", "show", run["id"]], ["logs", run["id"]]):
        loaded = _imported(cli, *args)
        assert not HEAVY & loaded, (args, HEAVY & loaded)
        assert "sqlalchemy" not in loaded, args  # the SQLite ledger is read with sqlite3
    assert not (HEAVY | {"sqlalchemy", "rich"}) & _imported(cli, "--help")
    # Job files need pydantic, but not the HTTP client nor the ledger.
    jobs = _imported(cli, "jobs", "list")
    assert not {"httpx", "aiohttp", "sqlalchemy", "jobrunner.runner"} & jobs


def test_the_read_path_knows_the_schema_revision_the_store_migrates_to() -> None:
    from jobrunner.cli.ledger_read import expected_revision
    from jobrunner.store.migrate import HEAD_REVISION

    assert expected_revision() == HEAD_REVISION


def test_runs_show_and_logs_read_what_the_store_recorded(cli: Cli) -> None:
    run = cli.json("run", "hello")
    shown = cli.json("runs", "show", run["id"][:10].lower())
    assert shown["id"] == run["id"] and shown["outcome"] == "succeeded"
    assert shown["machine_id"] == run["machine_id"]
    assert [t["to"] for t in shown["transitions"]][-1] == "succeeded"
    logs = cli("logs", run["id"])
    assert "Hello, world from machine" in logs.stdout
    missing = cli("runs", "show", "0123456789")
    assert missing.returncode == exitcodes.USAGE and "no run with id" in missing.stderr


# ---- gc ----------------------------------------------------------------------------------


def test_gc_names_each_orphan_and_refuses_without_yes_with_exit_2(cli: Cli) -> None:
    cli("run", "hello")  # makes sure the local backend is up
    info = json.loads((cli.home / "local" / "server.json").read_text())
    headers = {"Authorization": f"Bearer {read_token(cli.home / 'local')}"}
    config = {
        "image": "python:3.12-slim",
        "init": {"cmd": ["sleep", "60"]},
        "metadata": {"jobrunner_managed": "true", "jobrunner_run_id": "gone-run"},
    }
    created = httpx.post(
        f"{info['base_url']}/v1/apps/jobrunner-local/machines",
        json={"config": config},
        headers=headers,
    ).json()
    try:
        dry = cli("gc", "--dry-run")
        assert dry.returncode == 0
        line = next(ln for ln in dry.stderr.splitlines() if created["id"] in ln)
        assert "app=jobrunner-local" in line and "state=" in line and "run=gone-run" in line
        assert "would destroy 1" in dry.stderr

        refused = cli("gc")  # no terminal, no --yes
        assert refused.returncode == exitcodes.USAGE
        assert "refusing" in refused.stderr and "--yes" in refused.stderr
        assert created["id"] in refused.stderr
        assert [o["machine_id"] for o in cli.json("gc", "--dry-run")["orphans"]] == [created["id"]]
    finally:
        assert created["id"] in cli.json("gc", "--yes")["destroyed"]


# ---- what a run says ----------------------------------------------------------------------


def test_a_retry_says_why_the_attempt_failed_and_which_comes_next(cli: Cli, tmp_path: Path) -> None:
    job = _job(
        tmp_path,
        "flaky",
        'cmd = ["sh", "-c", "exit 3"]\n[retries]\nmax_attempts = 2\nbackoff = "1s"\n',
    )
    done = cli("run", str(job))
    assert done.returncode == 3
    assert "attempt 1 failed with exit code 3; attempt 2 of 2 in 1s" in done.stderr
    assert "attempt 1: attempt" not in done.stderr


def test_a_file_that_cannot_be_placed_shows_why_where_the_failure_is_shown(
    cli: Cli, tmp_path: Path
) -> None:
    job = _job(
        tmp_path,
        "badplace",
        'cmd = ["cat", "/newtop/y"]\n[[files]]\nguest_path = "/newtop/y"\ncontent = "x"\n',
    )
    done = cli("run", str(job))
    assert done.returncode != 0
    summary = done.stderr.strip().splitlines()[-1]
    assert "failed" in summary and "/newtop/y" in summary, done.stderr


def test_the_summary_line_has_outcome_exit_code_duration_machine_and_region(cli: Cli) -> None:
    done = cli("run", "hello")
    summary = done.stderr.strip().splitlines()[-1]
    assert re.search(
        r"run \w{26} succeeded with exit code 0 in \S+ on machine \w+ in local$", summary
    ), summary


def test_cancel_no_wait_says_the_cancel_was_requested(cli: Cli, tmp_path: Path) -> None:
    job = _job(tmp_path, "sleepy", 'cmd = ["sleep", "60"]\n')
    run_id = cli("run", str(job), "--detach").stdout.strip()
    try:
        cancelled = cli("cancel", run_id, "--no-wait")
        assert cancelled.returncode == 0
        assert f"cancel of run {run_id} requested" in cancelled.stderr
        assert " running\n" not in cancelled.stderr
    finally:
        assert cli("wait", run_id).returncode == exitcodes.CANCELLED


def test_a_long_silent_job_shows_its_state_and_time_on_a_terminal(cli: Cli, tmp_path: Path) -> None:
    job = _job(tmp_path, "quiet", 'cmd = ["sh", "-c", "sleep 2; echo done"]\n')
    shown = _on_a_terminal(["run", str(job)], {**cli.env, "TERM": "xterm", "COLUMNS": "120"})
    assert re.search(r"running for \d", shown), shown
    assert "\x1b[" not in shown  # NO_COLOR (set for every test here): no escape code at all
    last = shown.replace("\r", "\n").strip().splitlines()[-1]
    assert "succeeded with exit code 0" in last and "on machine" in last

    piped = cli("run", str(job))  # stderr is not a terminal: no status line
    assert "running for" not in piped.stderr and "\r" not in piped.stderr


# ---- plain output -------------------------------------------------------------------------


def test_no_color_means_no_escape_codes_on_a_terminal(cli: Cli) -> None:
    run = cli.json("run", "hello")
    env = {**cli.env, "TERM": "xterm-256color", "NO_COLOR": "1"}
    for args in (["runs", "list"], ["runs", "show", run["id"]], ["jobs", "list"], ["gc"]):
        shown = _on_a_terminal(args, env)
        assert "\x1b" not in shown, (args, shown)
    coloured = _on_a_terminal(["runs", "list"], {k: v for k, v in env.items() if k != "NO_COLOR"})
    assert "\x1b[" in coloured  # but a terminal without NO_COLOR gets its colours


def test_piped_jobs_list_is_complete_without_trailing_spaces(cli: Cli, tmp_path: Path) -> None:
    image = "registry.example.com/a/very/long/path/to/an/image/name:" + "v" * 60
    (tmp_path / "long.toml").write_text(f'image = "{image}"\ncmd = ["true"]\n')
    _job(tmp_path, "short", 'cmd = ["true"]\n')
    done = cli("jobs", "list", "--jobs-dir", str(tmp_path))
    assert done.returncode == 0
    assert image in done.stdout and str(tmp_path / "long.toml") in done.stdout
    assert all(line == line.rstrip() for line in done.stdout.splitlines())
    assert "\x1b" not in done.stdout


# ---- flags and arguments ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_local_start_honours_jobrunner_local_port(tmp_path: Path) -> None:
    with isolated_cli(tmp_path / "home") as cli:
        port = _free_port()
        started = cli("local", "start", "--json", extra_env={"JOBRUNNER_LOCAL_PORT": str(port)})
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["base_url"].endswith(f":{port}")


def test_runs_list_filters_by_app_and_reads_without_a_fly_token(cli: Cli) -> None:
    other = cli.json("run", "hello", "--app", "other-app")
    mine = cli.json("run", "hello")
    in_other = cli.json("runs", "list", "--app", "other-app")
    assert [r["id"] for r in in_other] == [other["id"]]
    assert mine["id"] in [r["id"] for r in cli.json("runs", "list", "--app", "jobrunner-local")]
    assert cli.json("runs", "list", "--app", "no-such-app") == []

    fly = cli("runs", "list", "--backend", "fly", "--json")  # no FLY_API_TOKEN in cli.env
    assert fly.returncode == 0, fly.stderr
    assert json.loads(fly.stdout) == []


def test_bad_override_flags_are_blamed_on_the_flag_not_the_job_file(cli: Cli) -> None:
    env = cli("run", "jobs/hello.toml", "--env", "1BAD=x")
    assert env.returncode == exitcodes.INVALID_JOB
    assert "--env 1BAD" in env.stderr and "hello.toml" not in env.stderr

    timeout = cli("run", "jobs/hello.toml", "--timeout", "0")
    assert timeout.returncode == exitcodes.USAGE
    assert "--timeout" in timeout.stderr and "hello.toml" not in timeout.stderr


def test_a_directory_as_job_says_what_to_pass(cli: Cli) -> None:
    done = cli("run", "jobs/")
    assert done.returncode == exitcodes.USAGE
    assert "is a directory" in done.stderr and "pass a job file such as jobs/" in done.stderr
    assert "not found" not in done.stderr


def test_a_jobs_dir_that_does_not_exist_is_an_error(cli: Cli) -> None:
    for args in (["jobs", "list"], ["jobs", "validate"]):
        done = cli(*args, "--jobs-dir", "/nonexistent/jobs")
        assert done.returncode == exitcodes.USAGE, args
        assert "does not exist" in done.stderr


def test_an_unusable_home_or_ledger_exits_78_as_documented(cli: Cli, tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("")
    for env in ({"JOBRUNNER_HOME": str(a_file)}, {"JOBRUNNER_DATABASE_URL": "mysql://x/y"}):
        for args in (["runs", "list"], ["run", "hello"], ["logs", "0123456789AB"]):
            done = cli(*args, extra_env=env)
            assert done.returncode == exitcodes.CONFIG, (env, args, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1
    assert re.search(r"^\| 78 \|.*JOBRUNNER_HOME", CLI_DOC, re.MULTILINE)


# ---- shell completion ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shell", "marker"),
    [("bash", "complete -o"), ("zsh", "#compdef jobrunner"), ("fish", "complete --no-files")],
)
def test_shell_completion_scripts(cli: Cli, shell: str, marker: str) -> None:
    done = cli(extra_env={"_JOBRUNNER_COMPLETE": f"{shell}_source"})
    assert done.returncode == 0 and marker in done.stdout and "_JOBRUNNER_COMPLETE" in done.stdout
    assert f"_JOBRUNNER_COMPLETE={shell}_source jobrunner" in CLI_DOC


def test_completion_offers_commands_and_subcommands(cli: Cli) -> None:
    def complete(words: str) -> list[str]:
        done = cli(
            extra_env={
                "_JOBRUNNER_COMPLETE": "bash_complete",
                "COMP_WORDS": words,
                "COMP_CWORD": str(len(words.split()) - 1),
            }
        )
        return [line.split(",", 1)[1] for line in done.stdout.splitlines()]

    assert {"run", "runs"} <= set(complete("jobrunner ru"))
    assert "list" in complete("jobrunner runs l")
