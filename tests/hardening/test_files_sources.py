"""Point 3 of issue 9: ``[[files]]`` sources stay inside the job file's folder (or a root the
user allowed with JOBRUNNER_FILES_ROOT), like a container build context."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobrunner.spec import JobSpecError, load_job

from ..cli.conftest import REPO

JOB = 'image = "alpine"\ncmd = ["true"]\n\n[[files]]\nguest_path = "/etc/x"\nsource = "{source}"\n'


def write_job(folder: Path, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.toml"
    path.write_text(JOB.format(source=source))
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "host-secret.txt"
    secret.parent.mkdir()
    secret.write_text("host-only data\n")
    return secret


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "symlinked-folder", "home"])
def test_sources_outside_the_job_folder_are_refused(
    tmp_path: Path, outside: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = tmp_path / "project" / "jobs"
    jobs.mkdir(parents=True)
    if kind == "dotdot":
        source = "../../outside/host-secret.txt"
    elif kind == "absolute":
        source = str(outside)
    elif kind == "symlink":
        (jobs / "innocent.txt").symlink_to(outside)
        source = "innocent.txt"
    elif kind == "symlinked-folder":
        (jobs / "data").symlink_to(outside.parent)
        source = "data/host-secret.txt"
    else:
        monkeypatch.setenv("HOME", str(outside.parent))
        source = "~/host-secret.txt"
    path = write_job(jobs, source)
    with pytest.raises(JobSpecError) as raised:
        load_job(path)
    (problem,) = raised.value.problems
    assert problem.file == str(path)
    assert problem.key == "files[0].source" and problem.value == source
    assert "outside the job file's folder" in problem.message
    assert "JOBRUNNER_FILES_ROOT" in problem.fix
    assert "host-only data" not in str(raised.value)


def test_sources_inside_the_folder_still_load(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    (jobs / "data").mkdir(parents=True)
    (jobs / "data" / "x.txt").write_bytes(b"inside")
    (jobs / "link.txt").symlink_to(jobs / "data" / "x.txt")  # a symlink that stays inside
    for source in ("data/x.txt", "./data/../data/x.txt", "link.txt", str(jobs / "data/x.txt")):
        job = load_job(write_job(jobs, source))
        assert job.files[0].data == b"inside", source


def test_an_explicit_files_root_allows_a_folder(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_job(tmp_path / "jobs", str(outside))
    monkeypatch.setenv("JOBRUNNER_FILES_ROOT", f"/nonexistent{os.pathsep}{outside.parent}")
    job = load_job(path)
    assert job.files[0].data == b"host-only data\n"


def test_the_cli_refuses_with_exit_65_and_never_records_the_file(
    tmp_path: Path, outside: Path
) -> None:
    path = write_job(tmp_path / "jobs", "../outside/host-secret.txt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "JOBRUNNER_"))}
    env["JOBRUNNER_HOME"] = str(tmp_path / "home")
    done = subprocess.run(
        [sys.executable, "-m", "jobrunner", "run", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 65, done.stderr
    assert "files[0].source" in done.stderr and "outside the job file's folder" in done.stderr
    assert "JOBRUNNER_FILES_ROOT" in done.stderr
    assert not (tmp_path / "home" / "jobrunner.db").exists()  # nothing was submitted


def test_a_source_file_over_the_size_limit_is_refused_at_load(tmp_path: Path) -> None:
    from jobrunner.spec.files import MAX_FILE_BYTES

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "big.bin").write_bytes(b"\0" * (MAX_FILE_BYTES + 1))
    with pytest.raises(JobSpecError) as raised:
        load_job(write_job(jobs, "big.bin"))
    (problem,) = raised.value.problems
    assert problem.key == "files[0].source" and "larger than 4 MiB" in problem.message
