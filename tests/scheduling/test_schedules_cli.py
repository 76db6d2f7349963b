"""The scheduling commands as a user runs them: job-file errors, list/next/pause/resume/trigger/
history, and a worker that runs a schedule end to end on the local backend."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.cli.conftest import REPO, Cli

TICK = 'image = "alpine"\ncmd = ["sh", "-c", "echo tick"]\n'


def write_job(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    ("keys", "key", "words"),
    [
        ('schedule = "61 * * * *"', "schedule", "minute"),
        ('schedule = "* * * * *"\ntimezone = "Mars/Olympus"', "timezone", "zone"),
        ('schedule = "fortnightly"\nnative = true', "schedule", "hourly, daily, weekly, monthly"),
        ('schedule = "*/5 * * * *"\nnative = true', "schedule", "native"),
        ('timezone = "UTC"', "timezone", "no schedule"),
        ('schedule = "* * * * *"\nconcurrency = "sometimes"', "concurrency", "allow"),
    ],
)
def test_bad_schedule_keys_are_job_file_errors(
    cli: Cli, tmp_path: Path, keys: str, key: str, words: str
) -> None:
    path = write_job(tmp_path / "jobs", "bad", TICK + keys + "\n")
    done = cli("jobs", "validate", str(path))
    assert done.returncode == 65, done.stderr
    assert key in done.stdout + done.stderr
    assert words.lower() in (done.stdout + done.stderr).lower()
    assert "Traceback" not in done.stderr


def test_list_next_pause_resume_trigger_history(cli: Cli, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs, "berlin", TICK + 'schedule = "30 2 * * *"\ntimezone = "Europe/Berlin"\n')
    write_job(jobs, "nightly", TICK + 'schedule = "daily"\nnative = true\n')
    write_job(jobs, "plain", TICK)
    listed = {row["name"]: row for row in cli.json("schedules", "list", "--jobs-dir", str(jobs))}
    assert set(listed) == {"berlin", "nightly"}
    berlin = listed["berlin"]
    assert berlin["timezone"] == "Europe/Berlin" and len(berlin["next"]) == 3
    assert not berlin["paused"] and berlin["last"] is None
    assert listed["nightly"]["native"] and listed["nightly"]["next"] == []

    times = cli.json("schedules", "next", "berlin", "-n", "4", "--jobs-dir", str(jobs))
    assert len(times) == 4
    assert all(datetime.fromisoformat(t["local"]).strftime("%H:%M") == "02:30" for t in times)

    assert cli.json("schedules", "pause", "berlin", "--jobs-dir", str(jobs))["paused"] is True
    assert cli.json("schedules", "list", "--jobs-dir", str(jobs))[0]["paused"] is True
    cli.json("schedules", "resume", "berlin", "--jobs-dir", str(jobs))
    assert cli.json("schedules", "list", "--jobs-dir", str(jobs))[0]["paused"] is False

    fired = cli.json("schedules", "trigger", "berlin", "--jobs-dir", str(jobs))
    assert fired["decision"] == "fired" and fired["trigger"] == "manual" and fired["run_id"]
    history = cli.json("schedules", "history", "berlin")
    assert len(history) == 1
    entry = history[0]
    assert {"schedule", "scheduled_for", "decision", "reason", "run_id"} <= set(entry)
    assert entry["schedule"] == "berlin" and entry["run_id"] == fired["run_id"]
    assert datetime.fromisoformat(entry["scheduled_for"]).utcoffset() is not None

    unknown = cli("schedules", "next", "nope", "--jobs-dir", str(jobs))
    assert unknown.returncode == 2 and "berlin" in unknown.stderr


@pytest.mark.slow
def test_a_worker_runs_a_schedule_and_history_shows_every_fire(cli: Cli, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs, "often", TICK + 'schedule = "*/2 * * * * *"\n')
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "jobrunner", "worker", "--jobs-dir", str(jobs)],
        cwd=REPO,
        env=cli.env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        finished: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            runs = cli.json("runs", "list", "--job", "often", "--state", "succeeded")
            finished = runs
            if len(finished) >= 3:
                break
            time.sleep(0.5)
        assert len(finished) >= 3, (tmp_path / "worker.log").read_text()
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()
    history = cli.json("schedules", "history", "often", "--limit", "1000")
    fired = [h for h in history if h["decision"] == "fired"]
    assert len(fired) >= 3
    # Every fire is its own run, and every tick decided once.
    assert len({h["run_id"] for h in fired}) == len(fired)
    assert len({h["scheduled_for"] for h in history}) == len(history)
    logs = cli("logs", str(finished[0]["id"]))
    assert logs.stdout.strip() == "tick"
    json.dumps(history)  # plain JSON all the way down


def test_sync_makes_one_machine_per_native_schedule_and_a_second_sync_does_nothing(
    cli: Cli, tmp_path: Path
) -> None:
    jobs = tmp_path / "native-jobs"
    write_job(jobs, "nightly", TICK + 'schedule = "daily"\nnative = true\n')
    planned = cli.json("schedules", "sync", "--dry-run", "--jobs-dir", str(jobs))
    kinds = [(a["job"], a["kind"]) for a in planned["actions"]]
    assert kinds == [("nightly", "create")], planned
    done = cli.json("schedules", "sync", "--jobs-dir", str(jobs))
    assert [(a["job"], a["kind"]) for a in done["actions"]] == [("nightly", "create")], done
    again = cli.json("schedules", "sync", "--jobs-dir", str(jobs))
    assert {a["kind"] for a in again["actions"]} == {"unchanged"}, again
    # gc never takes a schedule's persistent machine for an orphan.
    orphans = cli.json("gc", "--dry-run")
    assert orphans["orphans"] == [], orphans
    (jobs / "nightly.toml").unlink()
    gone = cli.json("schedules", "sync", "--jobs-dir", str(jobs))
    assert [(a["job"], a["kind"]) for a in gone["actions"]] == [("nightly", "destroy")], gone
