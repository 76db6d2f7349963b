"""Driving a run from the terminal: streamed output, progress, Ctrl-C, and detaching."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import anyio
from rich.markup import escape

from jobrunner.cli import exitcodes
from jobrunner.cli.common import err, print_json
from jobrunner.cli.render import run_dict, styled_state
from jobrunner.config import Settings, make_private_dir
from jobrunner.durations import format_duration
from jobrunner.errors import ConfigError, JobrunnerError
from jobrunner.events import RunEvent
from jobrunner.runner import TERMINAL, Runner, sole_error
from jobrunner.store import Run
from jobrunner.store.engine import is_in_memory_url, mask_url


class RunInterrupted(JobrunnerError):
    """The API or the ledger failed while this process drove a run; the run may be unfinished.

    Its message is the failure plus how to pick the run up again (exit code BACKEND_ERROR).
    """

    def __init__(self, run_id: str, cause: BaseException) -> None:
        super().__init__(
            f"{cause}\nrun {run_id} may not be finished (its machine may still be running); "
            f"`jobrunner wait {run_id}` resumes it and reports its outcome"
        )
        self.run_id = run_id


class TerminalPrinter:
    """Writes job output to stdout/stderr as it arrives and progress lines to stderr."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, event: RunEvent) -> None:
        if self.quiet:
            return
        if event.kind == "log":
            stream = sys.stderr if event.stream == "stderr" else sys.stdout
            stream.write(event.message + "\n")
            stream.flush()
            return
        if event.kind == "state" and event.state in TERMINAL:
            return  # the closing summary line says it, with the duration
        if event.kind == "attempt" and event.attempt == 1 and event.message.endswith(" of 1"):
            return  # a run without retries has nothing to say about attempts
        label = f"attempt {event.attempt}: " if event.attempt and event.kind == "retry" else ""
        err.print(f"[dim]jobrunner:[/] {escape(label + event.message)}")


def ensure_shared_ledger(settings: Settings, action: str, *, instead: str = "") -> None:
    """Refuse to ``action`` when the ledger lives in this process's memory only.

    A run handed to another process (a detached driver, a worker) must be in a ledger that
    process can open: with ``JOBRUNNER_DATABASE_URL=sqlite://`` it would never see the run.
    """
    if settings.database_url is not None and is_in_memory_url(settings.database_url):
        raise ConfigError(
            f"cannot {action}: JOBRUNNER_DATABASE_URL={mask_url(settings.database_url)!r} is "
            "an in-memory ledger that no other process can see; set JOBRUNNER_DATABASE_URL "
            f"to a file (sqlite:///path/jobrunner.db) or PostgreSQL{instead}"
        )


def spawn_driver(run_id: str, settings: Settings) -> None:
    """Hand a run to a detached background process that drives it to its outcome.

    The child inherits this environment (so the job's secrets reach a retry) but none of this
    process's standard streams: its output goes to a log file under JOBRUNNER_HOME.
    """
    ensure_shared_ledger(settings, "hand the run to a background process")
    log_dir = settings.home / "drivers"
    # The driver's output holds the job's (masked) log lines: its owner's eyes only.
    make_private_dir(log_dir)
    argv = [sys.executable, "-m", "jobrunner", "runs", "drive", run_id]
    argv += ["--backend", settings.backend, "--app", settings.app]
    log_path = log_dir / f"{run_id}.log"
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    with open(os.open(log_path, flags, 0o600), "ab") as log:
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ),
        )


@dataclass
class DriveResult:
    run: Run | None
    detached: bool


async def drive_interactively(
    runner: Runner, run_id: str, *, announce: bool, can_detach: bool = True
) -> DriveResult:
    """Drive ``run_id``; the first Ctrl-C cancels the run, a second one detaches (unless
    ``can_detach`` is False: with an in-memory ledger no other process could take it over)."""
    result = DriveResult(run=None, detached=False)
    try:
        async with anyio.create_task_group() as tg:

            async def drive() -> None:
                result.run = await runner.wait(run_id)
                tg.cancel_scope.cancel()

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    presses = 0
                    async for _ in signals:
                        presses += 1
                        if presses == 1:
                            await runner.ledger.request_cancel(run_id)
                            runner.request_cancel_local(run_id)
                            if announce:
                                err.print(
                                    "[yellow]cancelling the run[/] (press Ctrl-C again to detach)"
                                )
                        elif not can_detach:
                            err.print(
                                "[yellow]cannot detach[/]: the ledger is in this process's "
                                "memory (JOBRUNNER_DATABASE_URL=sqlite://); waiting for the "
                                "cancel to finish"
                            )
                        else:
                            result.detached = True
                            tg.cancel_scope.cancel()

            tg.start_soon(on_signals)
            tg.start_soon(drive)
    except BaseExceptionGroup as group:
        raise sole_error(group) from None  # the caller reports the API or ledger error itself
    return result


def report(run: Run, attempts: list, *, as_json: bool) -> int:  # type: ignore[type-arg]
    """Print a finished (or still running) run and return the exit code that reports it."""
    if as_json:
        print_json(run_dict(run, attempts))
    else:
        line = f"run {run.id} {styled_state(run.state)}"
        if run.state == "failed" and run.exit_code is not None:
            line += f" with exit code {run.exit_code}"
        if run.duration_s is not None:
            line += f" in {format_duration(run.duration_s)}"
        said = run.state == "succeeded" or (run.state == "failed" and run.exit_code is not None)
        if run.reason and not said:  # e.g. "the job exceeded its timeout", the API's refusal
            line += f": {escape(run.reason)}"
        err.print(f"[dim]jobrunner:[/] {line}")
    if run.finished_at is None:
        return exitcodes.DETACHED
    return exitcodes.for_outcome(run.state, run.exit_code)
