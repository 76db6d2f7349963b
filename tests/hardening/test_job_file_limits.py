"""Point 4 of issue 9: job files that would cost tomllib gigabytes or minutes are refused first.

Each shape gets exit 65 and a message naming the file, the line, the limit and the fix, within
a second (the budget allows for a busy test machine)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobrunner.spec import JobSpecError, load_job
from jobrunner.spec.tomlguard import MAX_JOB_FILE_BYTES, shape_problem

from ..cli.conftest import REPO

HEAD = 'image = "alpine"\ncmd = ["true"]\n'

SHAPES = {
    "dotted key of 200 KB": (HEAD + ".".join(["a"] * 100_000) + " = 1\n", "dotted key", 3),
    "5,000-digit integer": (HEAD + "n = " + "1" * 5000 + "\n", "number is longer", 3),
    "5,000-deep arrays": (HEAD + "n = " + "[" * 5000 + "]" * 5000 + "\n", "nested", 3),
    "3,000-deep inline tables": (
        HEAD + "n = " + "{a=" * 3000 + "1" + "}" * 3000 + "\n",
        "nested",
        3,
    ),
    "deep [table] header": (HEAD + "[" + ".".join(["t"] * 5000) + "]\n", "dotted key", 3),
    "dotted keys in an inline table": (
        HEAD + "m = {x = 1, " + ".".join(["b"] * 50) + " = 2}\n",
        "dotted key",
        3,
    ),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_pathological_shapes_are_refused_quickly(tmp_path: Path, name: str) -> None:
    text, words, line = SHAPES[name]
    path = tmp_path / "evil.toml"
    path.write_text(text)
    started = time.monotonic()
    with pytest.raises(JobSpecError) as raised:
        load_job(path)
    assert time.monotonic() - started < 1.0
    (problem,) = raised.value.problems
    assert problem.file == str(path) and problem.line == line
    assert words in problem.message and "too costly to read" in problem.message
    assert problem.fix


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    with path.open("w") as handle:
        handle.write(HEAD)
        handle.write(("# " + "x" * 1000 + "\n") * (MAX_JOB_FILE_BYTES // 1000 + 10))
    started = time.monotonic()
    with pytest.raises(JobSpecError) as raised:
        load_job(path)
    assert time.monotonic() - started < 1.0
    (problem,) = raised.value.problems
    assert "larger than 1024 KiB" in problem.message


ORDINARY = HEAD + (
    "# a comment with [[[ {{{ and " + ".".join("abcdefghijklmnopqrstuvwxyz0123456789") + "\n"
    'description = "dots ' + ". " * 40 + '"\n'
    "metadata = { team = 'data', n = '" + "[" * 100 + "' }\n"
    'timeout = "90s"\n'
    "[env]\n"
    'LONG = """\n' + "{" * 200 + '\n"""\n'
)


def test_ordinary_files_near_the_limits_still_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(ORDINARY)
    job = load_job(path)
    assert job.env["LONG"].startswith("{" * 200)
    assert shape_problem("x = 3.14159\ny = 1979-05-27T07:32:00Z\nz = [[1, 2], [3]]\n", None) is None


def test_the_cli_exits_65_within_a_second_and_small(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "JOBRUNNER_"))}
    env["JOBRUNNER_HOME"] = str(tmp_path / "home")
    for name, (text, words, _line) in SHAPES.items():
        path = tmp_path / "evil.toml"
        path.write_text(text)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            [sys.executable, "-m", "jobrunner", "jobs", "validate", str(path)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert done.returncode == 65, (name, done.stderr)
        said = done.stdout + done.stderr  # `jobs validate` reports on stdout
        assert "Traceback" not in said and "internal error" not in said
        assert str(path) in said and words in said and "line 3" in said, name
        # CPU time, so a busy machine does not make it flaky; interpreter start-up included.
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        assert cpu < 3.0, name
        assert after.ru_maxrss < 300_000, name  # KiB: far below the 23.5 GB seen before
