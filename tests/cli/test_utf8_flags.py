"""Flags holding bytes that are not UTF-8 are refused before any run is recorded.

The shell passes ``--env X=$'\\xff'`` as a raw 0xff byte, which Python holds as the lone surrogate
``\\udcff``. Such a run used to be recorded, then fail to be created (the Machines API takes JSON)
and stay ``creating`` for ever, breaking ``runs reconcile``. (A module of its own: its ledger must
stay empty.)
"""

from __future__ import annotations

import json

from .conftest import Cli

BAD = "\udcff"  # subprocess passes it to the command as the byte 0xff


def _assert_clean_error(stderr: str) -> None:
    assert "Traceback" not in stderr
    assert "internal error" not in stderr
    assert "UnicodeEncodeError" not in stderr


def test_env_flag_that_is_not_utf8_exits_65_naming_the_flag_and_key(cli: Cli) -> None:
    done = cli("run", "jobs/hello.toml", "--env", f"X={BAD}", "--env", "OK=fine")
    assert done.returncode == 65, done.stderr
    _assert_clean_error(done.stderr)
    assert "--env X: the value is not valid UTF-8" in done.stderr
    assert "0xff" in done.stderr and "base64" in done.stderr
    assert done.stdout == ""

    done = cli("run", "jobs/hello.toml", "--env", f"K{BAD}=v", "--detach")
    assert done.returncode == 65, done.stderr
    _assert_clean_error(done.stderr)
    assert "--env K\\udcff: the name is not valid UTF-8" in done.stderr


def test_a_secret_that_is_not_utf8_exits_65_without_showing_it(cli: Cli) -> None:
    done = cli(
        "run", "jobs/files-env-secret.toml", extra_env={"HELLO_TOKEN": f"s3cr3t-{BAD}-value"}
    )
    assert done.returncode == 65, done.stderr
    _assert_clean_error(done.stderr)
    assert "HELLO_TOKEN is not valid UTF-8" in done.stderr
    assert "s3cr3t" not in done.stderr + done.stdout


def test_other_text_flags_that_are_not_utf8_are_usage_errors(cli: Cli) -> None:
    for args in (
        ("run", "jobs/hello.toml", "--app", f"app{BAD}"),
        ("runs", "list", "--job", f"job{BAD}"),
    ):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        _assert_clean_error(done.stderr)
        assert "not valid UTF-8" in done.stderr


def test_nothing_was_recorded_and_reconcile_stays_clean(cli: Cli) -> None:
    test_env_flag_that_is_not_utf8_exits_65_naming_the_flag_and_key(cli)
    assert json.loads(cli("runs", "list", "--json").stdout) == []
    done = cli("runs", "reconcile", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
