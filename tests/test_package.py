"""The promises of the package itself: version, typing marker, README quickstart, CI script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jobrunner

REPO = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_version_flag_prints_the_package_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jobrunner", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"jobrunner, version {jobrunner.__version__}"


def test_the_package_ships_its_type_information() -> None:
    assert (Path(jobrunner.__file__).parent / "py.typed").exists()


def test_quickstart_is_two_one_line_commands_running_hello_and_the_tests() -> None:
    commands = quickstart_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    assert commands[0].endswith("jobrunner run jobs/hello.toml")
    assert "[test]" in commands[1] and commands[1].endswith("pytest")


def test_ci_runs_the_readmes_test_command_verbatim_with_postgres_required() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert quickstart_commands()[1] in ci
    assert "JOBRUNNER_REQUIRE_POSTGRES=1" in ci
    assert "ruff check" in ci and "mypy jobrunner" in ci


def test_every_doc_the_readme_links_exists() -> None:
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)]+)\)", readme)
    assert links
    assert [link for link in links if not (REPO / link).exists()] == []


def test_the_public_names_import_from_the_package_root() -> None:
    from jobrunner import AsyncJobRunner, Job, JobRunner, JobSpecError, RetryPolicy, Run, load_job

    assert {cls.__name__ for cls in (AsyncJobRunner, JobRunner, Job, Run)} == {
        "AsyncJobRunner",
        "JobRunner",
        "Job",
        "Run",
    }
    assert (
        callable(load_job)
        and issubclass(JobSpecError, Exception)
        and RetryPolicy().max_attempts == 1
    )
    assert sorted(jobrunner.__all__) == jobrunner.__all__
