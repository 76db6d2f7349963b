"""Loading a broken job file reports every problem at once, each with its key, value and fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from jobrunner.spec import JobSpecError, Problem, load_job

GOOD = """
image = "python:3.12-slim"
cmd = ["python3", "-c", "print(1)"]
"""


def _write(folder: Path, text: str, name: str = "job.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def _problems(path: Path, **kwargs: object) -> list[Problem]:
    with pytest.raises(JobSpecError) as caught:
        load_job(path, **kwargs)  # type: ignore[arg-type]
    return caught.value.problems


def _only(path: Path, **kwargs: object) -> Problem:
    problems = _problems(path, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, 'image = "python:3.12-slim"\ncmd = ["a", \ntimeout = 5\n')
    problem = _only(path)
    assert problem.file == str(path)
    assert (problem.line, problem.column) == (3, 1)
    assert problem.message.startswith("invalid TOML")
    assert str(problem).startswith(f"{path}: line 3, column 1: invalid TOML")


def test_unknown_keys_suggest_the_intended_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        GOOD
        + """
        timout = "5m"
        memory = 512
        [retries]
        max_attempt = 3
        [[files]]
        guest_path = "/etc/a"
        contents = "x"
        """,
    )
    by_key = {p.key: p for p in _problems(path)}
    assert by_key["timout"].fix == "did you mean timeout?"
    assert by_key["memory"].fix == "did you mean guest.memory_mb?"
    assert by_key["retries.max_attempt"].fix == "did you mean max_attempts?"
    assert by_key["files[0].contents"].fix == "did you mean content?"


def test_unknown_key_without_a_near_match_lists_the_valid_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD + '\n[guest]\nflavour = "vanilla"\n')
    problem = _only(path)
    assert problem.key == "guest.flavour"
    assert problem.fix.startswith("valid keys in [guest]: cpu_kind, cpus, gpu_kind")


def test_wrong_types_name_the_key_and_show_an_example(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        GOOD
        + """
        region = 5
        fallback_regions = "fra"
        [env]
        PORT = 8080
        DEBUG = true
        [guest]
        cpus = "2"
        """,
    )
    by_key = {p.key: p for p in _problems(path)}
    assert set(by_key) == {"region", "fallback_regions", "env.PORT", "env.DEBUG", "guest.cpus"}
    assert by_key["env.PORT"].value == 8080
    assert by_key["env.PORT"].message == "must be a string"
    assert 'PORT = "8080"' in by_key["env.PORT"].fix
    assert by_key["guest.cpus"].message == "must be a whole number"
    assert by_key["fallback_regions"].message == "must be a list"


def test_relative_guest_path_and_str_format(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        GOOD + '\n[[files]]\nguest_path = "/ok"\ncontent = "1"\n'
        '[[files]]\nguest_path = "etc/x"\ncontent = "2"\n',
    )
    problem = _only(path)
    assert str(problem) == (
        f"{path}: files[1].guest_path = 'etc/x': must be an absolute path; write '/etc/x'"
    )


def test_files_with_no_source_or_two_sources(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        GOOD
        + """
        [[files]]
        guest_path = "/etc/none"
        [[files]]
        guest_path = "/etc/two"
        content = "x"
        secret_name = "APP_CONFIG"
        """,
    )
    none, two = _problems(path)
    assert (none.key, two.key) == ("files[0]", "files[1]")
    assert none.message.endswith("it has none")
    assert two.message.endswith("it has content and secret_name")


def test_missing_source_file_is_reported_relative_to_the_job_file(tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    path = _write(folder, GOOD + '\n[[files]]\nguest_path = "/etc/x"\nsource = "data/x.txt"\n')
    problem = _only(path)
    assert problem.key == "files[0].source"
    assert problem.value == "data/x.txt"
    assert str(folder / "data" / "x.txt") in problem.message


def test_memory_not_allowed_for_the_cpu_kind(tmp_path: Path) -> None:
    path = _write(
        tmp_path, GOOD + '\n[guest]\ncpu_kind = "performance"\ncpus = 1\nmemory_mb = 1024\n'
    )
    problem = _only(path)
    assert problem.key == "guest.memory_mb"
    assert problem.value == 1024
    assert "performance CPUs take 2048..8192 MB each" in problem.message
    assert "memory_mb = 2048" in problem.fix


def test_bad_size_preset_suggests_the_closest(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD + '\nsize = "performance-3x"\n')
    problem = _only(path)
    assert (problem.key, problem.message) == ("size", "unknown size preset")
    assert problem.fix.startswith("did you mean 'performance-")
    assert "shared-cpu-1x" in problem.fix


def test_bad_durations(tmp_path: Path) -> None:
    path = _write(
        tmp_path, GOOD + '\ntimeout = "10 minutes"\nstop_timeout = -1\n[retries]\nbackoff = "x"\n'
    )
    by_key = {p.key: p for p in _problems(path)}
    assert set(by_key) == {"timeout", "stop_timeout", "retries.backoff"}
    assert "not a duration" in by_key["timeout"].message
    assert '"90s"' in by_key["timeout"].fix


def test_zero_timeout_is_refused(tmp_path: Path) -> None:
    problem = _only(_write(tmp_path, GOOD + "\ntimeout = 0\n"))
    assert (problem.key, problem.message) == ("timeout", "must be longer than zero")


def test_secret_not_set_names_only_the_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD + '\nsecrets = ["API_TOKEN", "DB_PASSWORD"]\n')
    environ = {"API_TOKEN": "tok-123-value"}

    problem = _only(path, environ=environ)

    assert (problem.key, problem.value) == ("secrets[1]", "DB_PASSWORD")
    assert problem.message == "environment variable DB_PASSWORD is not set"
    assert load_job(path, check_secrets=False).secrets == ["API_TOKEN", "DB_PASSWORD"]
    full = load_job(path, environ={**environ, "DB_PASSWORD": "pw-456-value"})
    assert "tok-123-value" not in repr(full) and "pw-456-value" not in repr(full)


def test_both_guest_and_size(tmp_path: Path) -> None:
    problem = _only(_write(tmp_path, GOOD + '\nsize = "shared-cpu-2x"\n[guest]\ncpus = 2\n'))
    assert problem.key == "size"
    assert "not both" in problem.message


def test_a_job_with_only_an_image_leaves_the_command_to_the_image(tmp_path: Path) -> None:
    # As `fly machine run IMAGE`: the image's own entrypoint and command run (the local backend
    # takes them from its catalog of images, docs/local-backend.md "Images").
    job = load_job(_write(tmp_path, 'image = "python:3.12-slim"\n'))
    init = job.init()
    assert (init.exec, init.entrypoint, init.cmd) == (None, None, None)


def test_an_invalid_cron_expression_names_the_key(tmp_path: Path) -> None:
    problem = _only(_write(tmp_path, GOOD + '\nschedule = "0 25 * * *"\n'))
    assert problem.key == "schedule"
    assert "hour" in problem.message and "*/15" in problem.fix


def test_missing_image_and_every_other_problem_together(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        name = "bad name!"
        cmd = "python3 -c 'unclosed"
        timeout = "forever"
        comand = "x"
        [[files]]
        guest_path = "relative"
        """,
        name="multi.toml",
    )
    with pytest.raises(JobSpecError) as caught:
        load_job(path)
    keys = [p.key for p in caught.value.problems]
    assert set(keys) == {"name", "image", "cmd", "timeout", "files[0].guest_path", "comand"}
    lines = str(caught.value).splitlines()
    assert len(lines) == len(keys)
    assert all(line.startswith(f"{path}: ") for line in lines)
    image = next(p for p in caught.value.problems if p.key == "image")
    assert image.message == "is required"
    assert 'image = "python:3.12-slim"' in image.fix


def test_file_name_that_is_not_a_valid_job_name(tmp_path: Path) -> None:
    problem = _only(_write(tmp_path, GOOD, name="my job.toml"))
    assert (problem.key, problem.value) == ("name", "my job")
    assert "file name" in problem.fix
