"""What every command promises: --json/--backend/--app, documented exit codes, one-line errors,
colour only on a terminal and never with NO_COLOR, and a clear exit when the API is down."""

from __future__ import annotations

import json
import os
import pty
import re
import socket
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

from jobrunner.cli import COMMANDS, exitcodes, main
from jobrunner.cli.common import JobrunnerGroup
from jobrunner.machines.errors import MachinesConnectionError
from jobrunner.runner import TERMINAL
from jobrunner.store import RunNotFound, Store

from .conftest import REPO, Cli

CLI_DOC = (REPO / "docs" / "cli.md").read_text()
# The local backend's commands are documented in docs/local-backend.md and are not run commands.
RUN_COMMANDS = sorted(set(COMMANDS) - {"local"})


def leaf_commands() -> dict[str, click.Command]:
    """Every user-facing command by its full name ("runs list"), hidden ones left out."""
    ctx = click.Context(main)
    found: dict[str, click.Command] = {}
    for name in RUN_COMMANDS:
        command = main.get_command(ctx, name)
        assert command is not None
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                if not sub.hidden:
                    found[f"{name} {sub.name}"] = sub
        else:
            found[name] = command
    return found


def test_every_command_has_json_backend_and_app() -> None:
    commands = leaf_commands()
    assert {"run", "wait", "cancel", "logs", "gc", "runs list", "runs show"} <= set(commands)
    assert {"runs reconcile", "jobs list", "jobs validate"} <= set(commands)
    for name, command in commands.items():
        options = {opt for param in command.params for opt in param.opts}
        assert {"--json", "--backend", "--app"} <= options, name


def test_docs_describe_every_command_and_every_exit_code() -> None:
    for name in leaf_commands():
        assert f"`jobrunner {name}" in CLI_DOC, f"docs/cli.md does not describe {name}"
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", CLI_DOC, re.MULTILINE)}
    codes = {
        value
        for key, value in vars(exitcodes).items()
        if key.isupper() and isinstance(value, int) and key != "OK"
    }
    assert codes <= documented | {exitcodes.OK}, f"undocumented: {codes - documented}"


def _group_raising(error: BaseException) -> click.Group:
    @click.group(cls=JobrunnerGroup)
    def group() -> None:
        pass

    @group.command()
    def boom() -> None:
        raise error

    return group


def test_api_errors_are_one_line_with_their_own_exit_code_even_from_a_task_group() -> None:
    outage = MachinesConnectionError(
        method="GET",
        path="/v1/x",
        host="127.0.0.1",
        reason="refused",
        request_sent=False,
        retryable=True,
    )
    wrapped = ExceptionGroup("unhandled errors in a TaskGroup", [ExceptionGroup("", [outage])])
    result = CliRunner().invoke(_group_raising(wrapped), ["boom"])
    assert result.exit_code == exitcodes.BACKEND_ERROR
    assert "no answer from 127.0.0.1" in result.output
    assert "internal error" not in result.output and "TaskGroup" not in result.output

    unknown = CliRunner().invoke(_group_raising(RunNotFound("01ABCDEF")), ["boom"])
    assert unknown.exit_code == exitcodes.USAGE and "01ABCDEF" in unknown.output


def _on_a_terminal(args: list[str], env: dict[str, str]) -> str:
    """Run ``jobrunner ARGS`` with stdout and stderr on a pseudo-terminal; return what it showed."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "jobrunner", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    shown = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal closed with the process
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
        process.wait(timeout=30)
    return shown.decode(errors="replace")


def test_colour_on_a_terminal_but_not_with_no_color_nor_in_a_pipe(cli: Cli) -> None:
    env = {k: v for k, v in cli.env.items() if k != "NO_COLOR"}
    env.update(TERM="xterm-256color", COLUMNS="100")
    args = ["jobs", "validate", "jobs/hello.toml"]
    green = "\x1b[32m"

    coloured = _on_a_terminal(args, env)
    assert "ok" in coloured and green in coloured

    plain = _on_a_terminal(args, {**env, "NO_COLOR": "1"})
    assert "ok" in plain and green not in plain

    piped = subprocess.run(
        [sys.executable, "-m", "jobrunner", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "ok" in piped.stdout and "\x1b[" not in piped.stdout


def test_an_api_outage_during_run_exits_74_and_says_how_to_resume(cli: Cli, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    token = "FlyV1 fm2_test-token-that-must-not-leak"
    outage = Cli(
        tmp_path,
        {
            **cli.env,
            "JOBRUNNER_HOME": str(tmp_path),
            "FLY_API_TOKEN": token,
            "FLY_APP": "jobs-app",
            "FLY_API_HOSTNAME": closed,
            "FLY_API_BASE_URL": closed,
        },
    )

    done = outage("run", "hello")

    assert done.returncode == exitcodes.BACKEND_ERROR, done.stderr
    assert "no answer from 127.0.0.1" in done.stderr
    assert "jobrunner wait" in done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    assert "test-token-that-must-not-leak" not in done.stderr + done.stdout
    with Store(f"sqlite:///{tmp_path / 'jobrunner.db'}") as store:  # faster than a CLI call
        (run,) = store.list_runs()
    assert run.finished_at is None  # unfinished, so a later `wait` or `reconcile` resumes it

    # reconcile says which run it could not finish, and exits non-zero
    again = outage("runs", "reconcile", "--json")
    assert again.returncode == exitcodes.BACKEND_ERROR
    assert [r["id"] for r in json.loads(again.stdout)] == [run.id]
    assert run.id in again.stderr


def test_docs_explain_every_outcome_a_run_can_have() -> None:
    runs_doc = (REPO / "docs" / "runs.md").read_text()
    for outcome in TERMINAL:
        assert f"| `{outcome}` |" in runs_doc, outcome
        assert f"`{outcome}`" in CLI_DOC, outcome
