"""The example jobs shipped in jobs/: all load, and their commands work with a host python3/sh."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from jobrunner.spec import Job, discover_jobs, load_job

JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"
EXAMPLES = ["hello", "fail", "files-env-secret", "timeout"]
ENVIRON = {"HELLO_TOKEN": "example-token-value"}


def _argv(job: Job) -> list[str]:
    init = job.init()
    return list(init.exec or [*(init.entrypoint or []), *(init.cmd or [])])


def _machine_env(job: Job) -> dict[str, str]:
    config = job.to_machine_config(environ=ENVIRON, metadata={})
    # What the local backend adds for every machine; PATH lets the host find python3 and sh.
    return {
        **(config.env or {}),
        "FLY_MACHINE_ID": "3d8d9e1f2a4b6c",
        "FLY_REGION": "local",
        "PATH": "/usr/local/bin:/usr/bin:/bin",
    }


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_loads_with_the_local_image(name: str) -> None:
    job = load_job(name, jobs_dir=JOBS_DIR, environ=ENVIRON)
    assert job.name == name
    assert job.image == "python:3.12-slim"
    assert job.description
    assert _argv(job), "the local backend needs an explicit command"


def test_discover_finds_exactly_the_examples_all_valid() -> None:
    found = discover_jobs(JOBS_DIR, check_secrets=True, environ=ENVIRON)
    assert sorted(p.stem for p, _ in found) == sorted(EXAMPLES)
    assert all(isinstance(result, Job) for _, result in found), found


def test_hello_greets_with_machine_and_region() -> None:
    job = load_job("hello", jobs_dir=JOBS_DIR)
    done = subprocess.run(
        _argv(job), env=_machine_env(job), capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    assert "Hello, world from machine 3d8d9e1f2a4b6c in region local!" in done.stdout


def test_fail_explains_and_exits_3() -> None:
    job = load_job("fail", jobs_dir=JOBS_DIR)
    done = subprocess.run(
        _argv(job), env=_machine_env(job), capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 3
    assert "giving up" in done.stderr


def test_files_env_secret_places_both_files_and_needs_the_secret(tmp_path: Path) -> None:
    job = load_job("files-env-secret", jobs_dir=JOBS_DIR, environ=ENVIRON)
    assert [f.guest_path for f in job.files] == [
        "/etc/hello/config.json",
        "/etc/hello/greeting.txt",
    ]
    assert job.secrets == ["HELLO_TOKEN"] and job.env == {"APP_MODE": "demo"}
    config = job.to_machine_config(environ=ENVIRON, metadata={}).to_api()
    assert config["env"]["HELLO_TOKEN"] == "example-token-value"
    assert "example-token-value" not in str(job.snapshot())

    # The script, with its guest paths pointed at local copies, prints what it promises (the
    # local backend places the real paths in a private mount namespace).
    script = _argv(job)[-1]
    for spec in job.files:
        local = tmp_path / Path(spec.guest_path).name
        local.write_bytes(spec.data or b"")
        script = script.replace(spec.guest_path, str(local))
    done = subprocess.run(
        ["python3", "-c", script],
        env=_machine_env(job),
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert done.returncode == 0, done.stderr
    assert "config.json says: hello from a job file x 2" in done.stdout
    assert "greeting.txt says: Hello from a file that travelled with the job!" in done.stdout
    assert "APP_MODE = demo" in done.stdout
    assert "HELLO_TOKEN is set: 19 characters" in done.stdout
    assert "example-token-value" not in done.stdout


def test_timeout_job_outlives_its_timeout() -> None:
    job = load_job("timeout", jobs_dir=JOBS_DIR)
    assert job.timeout == 2.0
    assert (job.stop_signal, job.stop_timeout) == ("SIGTERM", 1.0)
    process = subprocess.Popen(
        _argv(job), env=_machine_env(job), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(b"sleeping for 30 seconds")
        time.sleep(job.timeout / 4)
        assert process.poll() is None, "still running: the runner's timeout must stop it"
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
