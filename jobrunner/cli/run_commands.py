"""``jobrunner run``, ``wait``, ``cancel`` and ``logs``: one run at a time."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anyio
import click

from jobrunner.claims import owner_is_alive
from jobrunner.cli import exitcodes
from jobrunner.cli.common import CliContext, common_options, err, print_json
from jobrunner.cli.driving import (
    RunInterrupted,
    TerminalPrinter,
    drive_interactively,
    ensure_shared_ledger,
    report,
    spawn_driver,
)
from jobrunner.cli.render import run_dict
from jobrunner.config import Settings
from jobrunner.durations import parse_duration
from jobrunner.errors import JobrunnerError
from jobrunner.runner import WrongBackend
from jobrunner.session import open_runner, open_store
from jobrunner.spec import MISSING, Job, JobSpecError, Problem, load_job
from jobrunner.spec.text import UTF8_FIX, printable, utf8_problem
from jobrunner.store import LogLine
from jobrunner.store.engine import is_in_memory_url


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    problems: list[Problem] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--env")
        # The shell passes bytes that are not UTF-8 as lone surrogates, which the Machines API
        # cannot take: refuse them here (exit 65, like a bad job file), before any run exists.
        for part, text in (("name", key), ("value", value)):
            problem = utf8_problem(text)
            if problem is not None:
                problems.append(
                    Problem(
                        None, f"--env {printable(key)}", MISSING, f"the {part} {problem}", UTF8_FIX
                    )
                )
        env[key] = value
    if problems:
        raise JobSpecError(problems)
    return env


@click.command("run")
@click.argument("job_ref", metavar="JOB")
@click.option(
    "--env", "-e", "env", multiple=True, metavar="KEY=VALUE", help="Set or override an env var."
)
@click.option(
    "--timeout", metavar="DURATION", help="Override the job's timeout, e.g. 90s, 10m, 2h."
)
@click.option("--detach", "-d", is_flag=True, help="Print the run id and return; the run goes on.")
@click.option(
    "--jobs-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("jobs"),
    show_default=True,
    help="Where to look up JOB when it is a name rather than a path.",
)
@common_options
def run_command(
    job_ref: str,
    env: tuple[str, ...],
    timeout: str | None,
    detach: bool,
    jobs_dir: Path,
    ctx: CliContext,
) -> None:
    """Run JOB (a path to a .toml file, or a job name in --jobs-dir) as an ephemeral machine.

    Streams the job's output and exits with the job's exit code; see docs/cli.md for the codes
    used when a job times out, is cancelled or cannot start. Ctrl-C cancels the run; a second
    Ctrl-C detaches and leaves a background process to finish it.
    """
    settings = ctx.settings()
    overrides = _parse_env(env)
    try:
        timeout_s = parse_duration(timeout, key="--timeout") if timeout is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--timeout") from exc
    job = load_job(job_ref, jobs_dir=jobs_dir).with_overrides(env=overrides, timeout=timeout_s)
    if detach:
        # Refused before anything is submitted: the detached driver could never see the run.
        ensure_shared_ledger(settings, "run with --detach", instead=", or run without --detach")
    code = anyio.run(_run, settings, job, detach, ctx.json)
    sys.exit(code)


async def _run(settings: Settings, job: Job, detach: bool, as_json: bool) -> int:
    printer = TerminalPrinter(quiet=as_json)
    async with open_runner(settings, on_event=printer) as runner:
        # A detached run is left for its background driver to claim.
        run = await runner.submit(job, trigger="cli", claim=not detach)
        if detach:
            spawn_driver(run.id, settings)
            if as_json:
                print_json({"id": run.id, "job": run.job_name, "state": run.state})
            else:
                click.echo(run.id)
                err.print(f"[dim]jobrunner:[/] follow it with: jobrunner logs --follow {run.id}")
            return exitcodes.OK
        try:
            result = await drive_interactively(
                runner,
                run.id,
                announce=not as_json,
                can_detach=not is_in_memory_url(settings.database_url or ""),
            )
        except JobrunnerError as exc:
            raise RunInterrupted(run.id, exc) from exc
        if result.detached:
            spawn_driver(run.id, settings)
            err.print(f"detached; the run goes on. Reattach with: jobrunner wait {run.id}")
            if as_json:  # scripts get the run id (and its state now) on stdout, as with --detach
                current = await runner.ledger.get_run(run.id)
                print_json(run_dict(current))
            return exitcodes.DETACHED
        final = result.run or run
        await runner.logs_settled(final.id)  # every line printed before the summary
        attempts = await runner.ledger.get_attempts(final.id)
        return report(final, attempts, as_json=as_json)


@click.command("wait")
@click.argument("run_id", metavar="RUN")
@common_options
def wait_command(run_id: str, ctx: CliContext) -> None:
    """Wait for RUN to finish and exit with its exit code (as `run` would).

    If the process that was driving RUN has died, this command resumes driving it.
    """
    settings = ctx.settings()
    sys.exit(anyio.run(_wait, settings, run_id, ctx.json))


async def _wait(settings: Settings, run_id: str, as_json: bool) -> int:
    async with open_runner(settings, on_event=TerminalPrinter(quiet=as_json)) as runner:
        found = await runner.ledger.get_run(run_id)  # RunNotFound: exit 2
        try:
            run = await runner.wait(found.id)
        except WrongBackend:
            raise  # its message says which --backend to use; "wait again" would not help
        except JobrunnerError as exc:
            raise RunInterrupted(found.id, exc) from exc
        await runner.logs_settled(run.id)
        attempts = await runner.ledger.get_attempts(run.id)
        return report(run, attempts, as_json=as_json)


@click.command("cancel")
@click.argument("run_id", metavar="RUN")
@click.option("--no-wait", is_flag=True, help="Return once the cancel is requested.")
@common_options
def cancel_command(run_id: str, no_wait: bool, ctx: CliContext) -> None:
    """Cancel RUN: its machine is stopped and destroyed and the run recorded as cancelled."""
    settings = ctx.settings()
    sys.exit(anyio.run(_cancel, settings, run_id, no_wait, ctx.json))


async def _cancel(settings: Settings, run_id: str, no_wait: bool, as_json: bool) -> int:
    async with open_runner(settings, on_event=TerminalPrinter(quiet=True)) as runner:
        run = await runner.cancel(run_id)
        if not no_wait and run.finished_at is None:
            run = await runner.wait(run.id, poll=0.5)
        attempts = await runner.ledger.get_attempts(run.id)
        report(run, attempts, as_json=as_json)
        return exitcodes.OK


@click.command("logs")
@click.argument("run_id", metavar="RUN")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the run ends.")
@common_options
def logs_command(run_id: str, follow: bool, ctx: CliContext) -> None:
    """Print RUN's captured output (kept after its machine is gone)."""
    settings = ctx.settings()
    store = open_store(settings)
    try:
        run = store.get_run(run_id)
        last_id = 0
        hinted = False
        while True:
            lines = store.get_logs(run.id, after_id=last_id)
            for line in lines:
                last_id = line.id
                if ctx.json:
                    print_json_line(line)
                else:
                    stream = sys.stderr if line.stream == "stderr" else sys.stdout
                    stream.write(line.message + "\n")
                    stream.flush()
            if not follow or run.finished_at is not None:
                if follow and lines:
                    continue  # drain what arrived before the run finished
                return
            if not hinted and not owner_is_alive(run.owner, run.owner_expires_at):
                # Lines only arrive while some process drives the run; say how to get one.
                err.print(
                    f"[yellow]no process is driving run {run.id}[/]; "
                    f"`jobrunner wait {run.id}` resumes it (this command keeps following)"
                )
                hinted = True
            time.sleep(0.5)
            run = store.get_run(run.id)
    finally:
        store.close()


def print_json_line(line: LogLine) -> None:
    data = {
        "id": line.id,
        "attempt": line.attempt_number,
        "timestamp": line.ts.isoformat(),
        "stream": line.stream,
        "message": line.message,
    }
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()
