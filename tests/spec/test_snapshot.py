"""Snapshots: what the store records for a run, and the same Job rebuilt from it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from jobrunner.spec import Job, JobSpecError, load_job

JOB_FILE = """
image = "python:3.12-slim"
cmd = "python3 /app/main.py --fast"
secrets = ["API_TOKEN"]
timeout = "10m"
region = "ams"
fallback_regions = ["fra"]
size = "shared-cpu-2x"

[env]
MODE = "prod"

[retries]
max_attempts = 3
exit_codes = [75]

[[files]]
guest_path = "/app/config.toml"
source = "config.toml"
mode = "0600"

[[files]]
guest_path = "/etc/motd"
content = "hello"
"""


@pytest.fixture
def job(tmp_path: Path) -> Job:
    (tmp_path / "config.toml").write_text("threads = 4\n")
    (tmp_path / "report.toml").write_text(JOB_FILE)
    return load_job(tmp_path / "report.toml", environ={"API_TOKEN": "super-secret-token"})


def test_snapshot_is_json_with_names_not_secret_values(job: Job) -> None:
    snapshot = job.snapshot()
    text = json.dumps(snapshot)

    assert "super-secret-token" not in text
    assert snapshot["secrets"] == ["API_TOKEN"]
    assert snapshot["timeout"] == 600.0
    assert snapshot["cmd"] == ["python3", "/app/main.py", "--fast"]
    source_file = snapshot["files"][0]
    assert source_file["source"] == "config.toml"
    assert base64.b64decode(source_file["raw_value"]) == b"threads = 4\n"
    assert snapshot["files"][1] == {"guest_path": "/etc/motd", "content": "hello"}
    assert snapshot["source_path"] == str(job.source_path)


def test_from_snapshot_rebuilds_the_same_job_without_the_local_files(
    job: Job, tmp_path: Path
) -> None:
    stored = json.loads(json.dumps(job.snapshot()))
    (tmp_path / "config.toml").unlink()  # the run is resumed later, maybe elsewhere

    rebuilt = Job.from_snapshot(stored)

    assert rebuilt == job
    assert rebuilt.source_path == job.source_path
    config = rebuilt.to_machine_config(environ={"API_TOKEN": "t"}, metadata={}).to_api()
    assert base64.b64decode(config["files"][0]["raw_value"]) == b"threads = 4\n"


def test_python_built_jobs_round_trip_too() -> None:
    job = Job(name="py", image="python:3.12", cmd=["true"], guest={"cpus": 2}, timeout=30)
    assert Job.from_snapshot(job.snapshot()) == job


def test_snapshot_of_another_format_is_refused(job: Job) -> None:
    snapshot = {**job.snapshot(), "format": 99}
    with pytest.raises(JobSpecError, match="format 1 only"):
        Job.from_snapshot(snapshot)


def test_with_overrides_merges_env_and_sets_timeout(job: Job) -> None:
    changed = job.with_overrides(env={"MODE": "staging", "EXTRA": "1"}, timeout=5)

    assert changed.env == {"MODE": "staging", "EXTRA": "1"}
    assert changed.timeout == 5.0
    assert changed.files == job.files and changed.source_path == job.source_path
    assert job.env == {"MODE": "prod"} and job.timeout == 600.0
    assert job.with_overrides() == job


def test_with_overrides_validates(job: Job) -> None:
    with pytest.raises(JobSpecError) as caught:
        job.with_overrides(env={"API_TOKEN": "in plain env"})
    assert [p.key for p in caught.value.problems] == ["secrets[0]"]
    with pytest.raises(JobSpecError):
        job.with_overrides(timeout=-1)
