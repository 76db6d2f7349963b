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
from jobrunner.config import Settings
from jobrunner.durations import format_duration
from jobrunner.events import RunEvent
from jobrunner.runner import TERMINAL, Runner
from jobrunner.store import Run


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


def spawn_driver(run_id: str, settings: Settings) -> None:
    """Hand a run to a detached background process that drives it to its outcome.

    The child inherits this environment (so the job's secrets reach a retry) but none of this
    process's standard streams: its output goes to a log file under JOBRUNNER_HOME.
    """
    log_dir = settings.home / "drivers"
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "jobrunner", "runs", "drive", run_id]
    argv += ["--backend", settings.backend, "--app", settings.app]
    with open(log_dir / f"{run_id}.log", "ab") as log:
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


async def drive_interactively(runner: Runner, run_id: str, *, announce: bool) -> DriveResult:
    """Drive ``run_id``; the first Ctrl-C cancels the run, a second one detaches."""
    result = DriveResult(run=None, detached=False)
    async with anyio.create_task_group() as tg:

        async def drive() -> None:
            result.run = await runner.drive(run_id)
            tg.cancel_scope.cancel()

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                presses = 0
                async for _ in signals:
                    presses += 1
                    if presses == 1:
                        await anyio.to_thread.run_sync(runner.store.request_cancel, run_id)
                        runner.request_cancel_local(run_id)
                        if announce:
                            err.print(
                                "[yellow]cancelling the run[/] (press Ctrl-C again to detach)"
                            )
                    else:
                        result.detached = True
                        tg.cancel_scope.cancel()

        tg.start_soon(on_signals)
        tg.start_soon(drive)
    return result


def report(run: Run, attempts: list, *, as_json: bool) -> int:  # type: ignore[type-arg]
    """Print a finished (or still running) run and return the exit code that reports it."""
    if as_json:
        print_json(run_dict(run, attempts))
    else:
        duration = format_duration(run.duration_s) if run.duration_s is not None else "?"
        line = f"run {run.id} {styled_state(run.state)}"
        if run.state == "failed" and run.exit_code is not None:
            line += f" with exit code {run.exit_code}"
        elif run.reason and run.state not in ("succeeded",):
            line += f": {escape(run.reason)}"
        err.print(f"[dim]jobrunner:[/] {line} in {duration}")
    if run.finished_at is None:
        return exitcodes.DETACHED
    return exitcodes.for_outcome(run.state, run.exit_code)
