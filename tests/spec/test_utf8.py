"""Text a job cannot send as JSON (lone surrogates, i.e. bytes that were not UTF-8) is refused.

Python holds bytes that are not UTF-8 from argv, the environment or file names as lone surrogates
("surrogateescape"); the Machines API and the ledger take JSON, so such a job would be recorded and
then fail when its machine is created. It is refused where it enters, naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jobrunner.spec import MISSING, Job, JobFile, JobSpecError, load_job
from jobrunner.spec.text import is_utf8, printable, utf8_problem

BAD = "\udcff"  # how Python decodes the byte 0xff with surrogateescape


def _problems(**overrides: Any) -> list[tuple[str, Any]]:
    values: dict[str, Any] = {"name": "x", "image": "python:3.12", "cmd": ["sh", "-c", "true"]}
    values.update(overrides)
    with pytest.raises(JobSpecError) as caught:
        Job(**values)
    for problem in caught.value.problems:
        assert "not valid UTF-8" in problem.message
        assert "UTF-8" in problem.fix
        str(problem).encode("utf-8")  # the message itself is printable anywhere
    return [(p.key, p.value) for p in caught.value.problems]


def test_the_helper() -> None:
    assert is_utf8("héllo ✓") and utf8_problem("héllo ✓") is None
    assert not is_utf8(f"ab{BAD}")
    problem = utf8_problem(f"ab{BAD}")
    assert problem is not None
    assert "character 3" in problem and "U+DCFF" in problem and "0xff" in problem
    assert "0x" not in (utf8_problem("\ud800") or "")  # a surrogate that is not a raw byte
    assert printable(f"a{BAD}") == "a\\udcff"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"env": {"X": BAD, "OK": "fine"}}, [("env.X", BAD)]),
        ({"cmd": ["sh", "-c", f"echo {BAD}"]}, [("cmd[2]", f"echo {BAD}")]),
        ({"cmd": f"echo {BAD}"}, [("cmd[1]", BAD)]),  # a command string, split like a shell
        ({"cmd": None, "entrypoint": [BAD]}, [("entrypoint[0]", BAD)]),
        ({"cmd": None, "exec": ["sh", BAD]}, [("exec[1]", BAD)]),
        ({"image": f"python:{BAD}"}, [("image", f"python:{BAD}")]),
        ({"description": BAD}, [("description", BAD)]),
        ({"metadata": {"team": BAD}}, [("metadata.team", BAD)]),
        (
            {"files": [{"guest_path": f"/etc/{BAD}", "content": "x"}]},
            [("files[0].guest_path", f"/etc/{BAD}")],
        ),
        ({"files": [{"guest_path": "/etc/a", "content": BAD}]}, [("files[0].content", BAD)]),
        ({"files": [{"guest_path": "/etc/a", "source": BAD}]}, [("files[0].source", BAD)]),
        ({"guest": {"cpu_kind": "performance", "gpu_kind": BAD}}, [("guest.gpu_kind", BAD)]),
    ],
)
def test_python_jobs_refuse_text_that_is_not_utf8(
    overrides: dict[str, Any], expected: list[tuple[str, Any]]
) -> None:
    assert _problems(**overrides) == expected


def test_a_table_key_that_is_not_utf8_is_named_printably() -> None:
    # pydantic spells such keys lossily; the problems name the real key, escaped.
    problems = _problems(env={f"K{BAD}": BAD}, metadata={BAD: "x"})
    assert problems == [
        ("env.K\\udcff", MISSING),
        ("env.K\\udcff", BAD),
        ("metadata.\\udcff", MISSING),
    ]


def test_every_problem_is_reported_with_the_others() -> None:
    with pytest.raises(JobSpecError) as caught:
        Job(name="x", image=BAD, cmd=["sh"], env={"X": BAD}, region="NOPE")
    assert sorted(p.key for p in caught.value.problems) == ["env.X", "image", "region"]


def test_a_file_entry_alone_refuses_content_that_is_not_utf8() -> None:
    with pytest.raises(ValueError, match="not valid UTF-8"):
        JobFile(guest_path="/etc/a", content=f"x{BAD}")


def test_with_overrides_refuses_an_env_value_that_is_not_utf8() -> None:
    job = Job(name="x", image="i", cmd=["sh"])
    with pytest.raises(JobSpecError) as caught:
        job.with_overrides(env={"X": BAD})
    assert [(p.key, p.value) for p in caught.value.problems] == [("env.X", BAD)]


def test_a_secret_whose_value_is_not_utf8_is_named_without_its_value() -> None:
    secret = f"hunter2-{BAD}-tail"
    job = Job(name="x", image="i", cmd=["true"], secrets=["OK", "TOKEN"])
    with pytest.raises(JobSpecError) as caught:
        job.to_machine_config(environ={"OK": "fine", "TOKEN": secret}, metadata={})
    problems = caught.value.problems
    assert [(p.key, p.value) for p in problems] == [("secrets[1]", "TOKEN")]
    assert "TOKEN" in problems[0].message and "not valid UTF-8" in problems[0].message
    shown = str(caught.value) + repr(problems)
    for fragment in ("hunter2", "tail", "udcff", "0xff", "character"):
        assert fragment not in shown


def test_loading_a_job_checks_the_secrets_values_before_any_run(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('image = "i"\ncmd = ["true"]\nsecrets = ["TOKEN"]\n')
    with pytest.raises(JobSpecError) as caught:
        load_job(path, environ={"TOKEN": f"s3cr3t{BAD}"})
    (problem,) = caught.value.problems
    assert (problem.file, problem.key, problem.value) == (str(path), "secrets[0]", "TOKEN")
    assert "s3cr3t" not in str(caught.value)
    assert load_job(path, check_secrets=False).secrets == ["TOKEN"]  # listing needs no values


def test_a_job_file_whose_path_is_not_utf8_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / f"dir{BAD}"
    try:
        folder.mkdir()
    except (UnicodeEncodeError, OSError):
        pytest.skip("this file system cannot hold a name that is not UTF-8")
    path = folder / "job.toml"
    path.write_text('name = "x"\nimage = "i"\ncmd = ["true"]\n')
    with pytest.raises(JobSpecError) as caught:
        load_job(path)
    (problem,) = caught.value.problems
    assert "path is not valid UTF-8" in problem.message
    assert "\\udcff" in str(caught.value)
    str(caught.value).encode("utf-8")


def test_valid_unicode_is_accepted_and_sent() -> None:
    job = Job(name="x", image="i", cmd=["echo", "héllo ✓"], env={"X": "日本"}, metadata={"t": "é"})
    config = job.to_machine_config(environ={}, metadata={}).to_api()
    assert config["env"] == {"X": "日本"}
    assert config["init"]["cmd"] == ["echo", "héllo ✓"]
