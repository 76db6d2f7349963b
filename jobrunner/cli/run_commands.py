"""``jobrunner run``, ``wait``, ``cancel`` and ``logs``: one run at a time."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from jobrunner.cli import exitcodes
from jobrunner.cli.common import CliContext, common_options, err, print_json

if TYPE_CHECKING:
    from jobrunner.cli.ledger_read import LogRecord
    from jobrunner.config import Settings
    from jobrunner.spec import Job

# `logs` reads the ledger on the light path (ledger_read); `run`, `wait` and `cancel` import the
# runner, the client and the store when they run, not when this module is imported.


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    from jobrunner.spec import MISSING, JobSpecError, Problem
    from jobrunner.spec.text import UTF8_FIX, printable, utf8_problem

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


def _parse_timeout(raw: str | None) -> float | None:
    """--timeout as seconds; a bad or zero duration is the flag's fault (exit 2)."""
    if raw is None:
        return None
    from jobrunner.durations import parse_duration

    try:
        seconds = parse_duration(raw, key="--timeout")
    except ValueError as exc:
        message = str(exc).removeprefix("--timeout: ")
        raise click.BadParameter(message, param_hint="--timeout") from None
    if seconds <= 0:
        raise click.BadParameter(
            f"{raw!r} must be longer than zero; use e.g. 30s, 10m or 2h", param_hint="--timeout"
        )
    return seconds


def _load(job_ref: str, jobs_dir: Path) -> Job:
    from jobrunner.spec import JobNotFound, load_job

    try:
        return load_job(job_ref, jobs_dir=jobs_dir)
    except JobNotFound:
        _check_job_ref(job_ref)
        raise


def _check_job_ref(job_ref: str) -> None:
    """A directory given as JOB: say so, and what to pass instead (exit 2)."""
    path = Path(job_ref)
    if job_ref and path.is_dir():
        tomls = sorted(p.name for p in path.glob("*.toml"))[:5]
        hint = f" (it holds {', '.join(tomls)})" if tomls else ""
        raise click.BadParameter(
            f"{job_ref!r} is a directory{hint}; pass a job file such as "
            f"{path / (tomls[0] if tomls else 'JOB.toml')}, or a job name with --jobs-dir {path}",
            param_hint="JOB",
        )


def _with_overrides(job: Job, env: dict[str, str], timeout_s: float | None) -> Job:
    """The job with --env/--timeout applied; a problem they cause names the flag, not the file."""
    from jobrunner.spec import JobSpecError, Problem

    try:
        return job.with_overrides(env=env, timeout=timeout_s)
    except JobSpecError as exc:
        problems = []
        for p in exc.problems:
            name = p.key.removeprefix("env.") if p.key.startswith("env.") else None
            if name is not None and name in env:
                p = Problem(None, f"--env {name}", p.value, p.message, p.fix)
            elif p.key == "timeout" and timeout_s is not None:
                p = Problem(None, "--timeout", p.value, p.message, p.fix)
            problems.append(p)
        raise JobSpecError(problems) from None


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
    import anyio

    from jobrunner.cli.driving import ensure_shared_ledger

    settings = ctx.settings()
    overrides = _parse_env(env)
    timeout_s = _parse_timeout(timeout)
    job = _with_overrides(_load(job_ref, jobs_dir), overrides, timeout_s)
    if detach:
        # Refused before anything is submitted: the detached driver could never see the run.
        ensure_shared_ledger(settings, "run with --detach", instead=", or run without --detach")
    code = anyio.run(_run, settings, job, detach, ctx.json)
    sys.exit(code)


async def _run(settings: Settings, job: Job, detach: bool, as_json: bool) -> int:
    from jobrunner.cli.driving import (
        RunInterrupted,
        TerminalPrinter,
        drive_interactively,
        report,
        spawn_driver,
    )
    from jobrunner.cli.render import run_dict
    from jobrunner.errors import JobrunnerError
    from jobrunner.session import open_runner
    from jobrunner.store.engine import is_in_memory_url

    # The status line (state, elapsed time) only for a person watching: stderr is a terminal.
    printer = TerminalPrinter(quiet=as_json, live=not detach and _stderr_is_terminal())
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
                printer=printer,
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


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@click.command("wait")
@click.argument("run_id", metavar="RUN")
@common_options
def wait_command(run_id: str, ctx: CliContext) -> None:
    """Wait for RUN to finish and exit with its exit code (as `run` would).

    If the process that was driving RUN has died, this command resumes driving it.
    """
    import anyio

    settings = ctx.settings()
    sys.exit(anyio.run(_wait, settings, run_id, ctx.json))


async def _wait(settings: Settings, run_id: str, as_json: bool) -> int:
    from jobrunner.cli.driving import RunInterrupted, TerminalPrinter, report
    from jobrunner.errors import JobrunnerError
    from jobrunner.runner import WrongBackend
    from jobrunner.session import open_runner

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
    import anyio

    settings = ctx.settings()
    sys.exit(anyio.run(_cancel, settings, run_id, no_wait, ctx.json))


async def _cancel(settings: Settings, run_id: str, no_wait: bool, as_json: bool) -> int:
    from jobrunner.cli.driving import TerminalPrinter, report
    from jobrunner.cli.render import run_dict
    from jobrunner.session import open_runner

    async with open_runner(settings, on_event=TerminalPrinter(quiet=True)) as runner:
        run = await runner.cancel(run_id)
        if no_wait and run.finished_at is None:
            if as_json:
                data = run_dict(run, await runner.ledger.get_attempts(run.id))
                data["cancel_requested"] = True
                print_json(data)
            else:
                err.print(
                    f"jobrunner: cancel of run {run.id} requested (it is {run.state}); its "
                    f"driver stops the machine within seconds; `jobrunner wait {run.id}` "
                    "shows the outcome",
                    markup=False,
                )
            return exitcodes.OK
        if run.finished_at is None:
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
    from jobrunner.cli.ledger_read import reading

    # Reading the ledger needs no backend settings (and so no Fly token).
    with reading() as ledger:
        run = ledger.get_run(run_id)
        last_id = 0
        hinted = False
        while True:
            lines = ledger.logs(run.id, after_id=last_id)
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
            if not hinted:
                from jobrunner.claims import owner_is_alive

                if not owner_is_alive(run.owner, run.owner_expires_at):
                    # Lines only arrive while some process drives the run; say how to get one.
                    err.print(
                        f"[yellow]no process is driving run {run.id}[/]; "
                        f"`jobrunner wait {run.id}` resumes it (this command keeps following)"
                    )
                    hinted = True
            time.sleep(0.5)
            run = ledger.get_run(run.id)


def print_json_line(line: LogRecord) -> None:
    data = {
        "id": line.id,
        "attempt": line.attempt_number,
        "timestamp": line.ts.isoformat(),
        "stream": line.stream,
        "message": line.message,
    }
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()
