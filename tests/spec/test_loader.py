"""Finding job files by path or name, and discovering every job in a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobrunner.spec import Job, JobNotFound, JobSpecError, discover_jobs, load_job

GOOD = 'image = "python:3.12-slim"\ncmd = ["true"]\n'


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / "hello.toml").write_text(GOOD)
    (folder / "nightly.toml").write_text('name = "nightly-report"\n' + GOOD)
    return folder


def test_load_by_path_names_the_job_after_the_file(jobs_dir: Path) -> None:
    job = load_job(jobs_dir / "hello.toml")
    assert job.name == "hello"
    assert job.source_path == (jobs_dir / "hello.toml").absolute()
    assert load_job(str(jobs_dir / "nightly.toml")).name == "nightly-report"


def test_load_by_name_from_the_jobs_folder(jobs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_job("hello", jobs_dir=jobs_dir).name == "hello"
    assert load_job("nightly-report", jobs_dir=jobs_dir).name == "nightly-report"
    monkeypatch.chdir(jobs_dir.parent)
    assert load_job("hello").source_path == (jobs_dir / "hello.toml").absolute()


def test_unknown_name_suggests_a_close_one(jobs_dir: Path) -> None:
    with pytest.raises(JobNotFound) as caught:
        load_job("helo", jobs_dir=jobs_dir)
    assert "no job named 'helo'" in str(caught.value)
    assert "did you mean 'hello'?" in str(caught.value)
    with pytest.raises(JobNotFound) as caught:
        load_job("zzz", jobs_dir=jobs_dir)
    assert "hello, nightly-report" in str(caught.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(JobNotFound, match="job file not found"):
        load_job(tmp_path / "nope.toml")
    assert issubclass(JobNotFound, JobSpecError)


def test_discover_reports_good_and_bad_jobs_in_file_order(jobs_dir: Path) -> None:
    (jobs_dir / "broken.toml").write_text('image = "x"\ncmd = [1]\n')
    (jobs_dir / "twin.toml").write_text('name = "hello"\n' + GOOD)
    (jobs_dir / "notes.txt").write_text("not a job")

    found = discover_jobs(jobs_dir)

    assert [p.name for p, _ in found] == ["broken.toml", "hello.toml", "nightly.toml", "twin.toml"]
    results = dict((p.name, r) for p, r in found)
    assert isinstance(results["hello.toml"], Job)
    broken = results["broken.toml"]
    assert isinstance(broken, JobSpecError)
    assert [p.key for p in broken.problems] == ["cmd[0]"]
    twin = results["twin.toml"]
    assert isinstance(twin, JobSpecError)
    assert "already used by" in str(twin)


def test_discover_does_not_need_secrets_unless_asked(jobs_dir: Path) -> None:
    (jobs_dir / "secret.toml").write_text(GOOD + 'secrets = ["NOT_SET_ANYWHERE"]\n')
    lenient = dict((p.name, r) for p, r in discover_jobs(jobs_dir))
    strict = dict((p.name, r) for p, r in discover_jobs(jobs_dir, check_secrets=True, environ={}))
    assert isinstance(lenient["secret.toml"], Job)
    assert isinstance(strict["secret.toml"], JobSpecError)


def test_errors_survive_pickling(tmp_path: Path) -> None:
    import pickle

    (tmp_path / "bad.toml").write_text("cmd = 5\n")
    with pytest.raises(JobSpecError) as caught:
        load_job(tmp_path / "bad.toml")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert str(copy) == str(caught.value)
    assert copy.problems == caught.value.problems
