"""Point 5 of issue 9: a run is never handed to a process that cannot see the ledger."""

from __future__ import annotations

from pathlib import Path

from ..cli.conftest import Cli

QUICK_JOB = """
image = "python:3.12-slim"
cmd = ["python3", "-c", "print('quiet')"]
schedule = "0 3 * * *"
"""

IN_MEMORY = {"JOBRUNNER_DATABASE_URL": "sqlite://"}


def test_detach_with_an_in_memory_ledger_is_refused(fresh_cli: Cli, tmp_path: Path) -> None:
    job = tmp_path / "quick.toml"
    job.write_text(QUICK_JOB)
    done = fresh_cli("run", str(job), "--detach", extra_env=IN_MEMORY)
    assert done.returncode == 78, done.stderr  # configuration (docs/cli.md)
    assert done.stdout == ""  # no run id a user would try to follow
    assert "in-memory" in done.stderr and "JOBRUNNER_DATABASE_URL" in done.stderr
    assert "without --detach" in done.stderr
    assert not (fresh_cli.home / "drivers").exists()  # no driver was started


def test_runs_for_workers_with_an_in_memory_ledger_are_refused(
    fresh_cli: Cli, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "nightly.toml").write_text(QUICK_JOB)
    for args in (
        ("schedules", "trigger", "nightly", "--jobs-dir", str(jobs)),
        ("runs", "retry", "r-anything"),
    ):
        done = fresh_cli(*args, extra_env=IN_MEMORY)
        assert done.returncode == 78, (args, done.stderr)
        assert "in-memory ledger" in done.stderr, args
