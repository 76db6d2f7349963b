"""Driving a run from the terminal: streamed output, progress, Ctrl-C, and detaching."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
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
from jobrunner.store import Attempt, Run
from jobrunner.store.engine import is_in_memory_url, mask_url

# The runner's retry notice: "attempt 1 failed (exit code 3); attempt 2 of 3 in 1s".
_RETRY = re.compile(r"^attempt (\d+) (\w+) \((.*)\); (attempt \d+ of \d+ in .+)$")
_OUTCOME_WORDS = {
    "timed_out": "timed out",
    "oom_killed": "ran out of memory",
    "lost": "lost its machine (no exit event)",
    "create_failed": "could not create its machine",
    "cancelled": "was cancelled",
}
_SPINNER = "|/-\\"


def retry_line(message: str) -> str:
    """The runner's retry notice as a person reads it: why the attempt failed, what comes next.

    ``attempt 1 failed with exit code 3; attempt 2 of 3 in 1s``
    """
    found = _RETRY.match(message)
    if found is None:
        return message
    number, outcome, why, following = found.groups()
    if outcome == "failed":
        said = f"failed with {why}" if why.startswith("exit code") else f"failed ({why})"
    else:
        said = _OUTCOME_WORDS.get(outcome, outcome)
        if why and why != outcome:
            said += f" ({why})"
    return f"attempt {number} {said}; {following}"


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
    """Writes job output to stdout/stderr as it arrives and progress lines to stderr.

    With ``live`` (only when stderr is a terminal), a status line at the bottom of stderr shows
    the run's state and elapsed time while it goes, redrawn by :meth:`tick` and cleared before
    every line of output, so a long silent job still shows it is alive. The line is drawn with
    a carriage return and spaces only: no escape code.
    """

    def __init__(self, *, quiet: bool, live: bool = False) -> None:
        self.quiet = quiet
        self.live = live and not quiet
        self.state = "pending"
        self.machine_id: str | None = None
        self.started = time.monotonic()
        self._shown = 0  # characters of the status line now on screen
        self._frame = 0
        self._closed = False

    def __call__(self, event: RunEvent) -> None:
        if self.quiet:
            return
        if event.state is not None:
            self.state = event.state
        if event.machine_id is not None:
            self.machine_id = event.machine_id
        if event.kind == "log":
            self.clear()
            stream = sys.stderr if event.stream == "stderr" else sys.stdout
            stream.write(event.message + "\n")
            stream.flush()
            self._draw()
            return
        if event.kind == "state" and event.state in TERMINAL:
            return  # the closing summary line says it, with the duration
        if event.kind == "attempt" and event.attempt == 1 and event.message.endswith(" of 1"):
            return  # a run without retries has nothing to say about attempts
        message = retry_line(event.message) if event.kind == "retry" else event.message
        self.clear()
        err.print(f"[dim]jobrunner:[/] {escape(message)}")
        self._draw()

    def status_text(self) -> str:
        elapsed = format_duration(time.monotonic() - self.started)
        spin = _SPINNER[self._frame % len(_SPINNER)]
        text = f"{spin} {self.state.replace('_', ' ')} for {elapsed}"
        if self.machine_id:
            text += f" (machine {self.machine_id})"
        return text + "; Ctrl-C cancels"

    def tick(self) -> None:
        """Redraw the status line (call a few times a second while the run goes)."""
        self._frame += 1
        self._draw()

    def close(self) -> None:
        """Remove the status line for good (before the summary)."""
        self.clear()
        self._closed = True

    def _draw(self) -> None:
        if not self.live or self._closed:
            return
        width = max(10, shutil.get_terminal_size((80, 24)).columns - 1)
        text = self.status_text()[:width]
        text += " " * max(0, self._shown - len(text))  # covers a longer line drawn before
        sys.stderr.write("\r" + text)
        sys.stderr.flush()
        self._shown = len(text)

    def clear(self) -> None:
        """Take the status line off the screen (it comes back with the next tick)."""
        if not self.live or not self._shown:
            return
        sys.stderr.write("\r" + " " * self._shown + "\r")
        sys.stderr.flush()
        self._shown = 0


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
    runner: Runner,
    run_id: str,
    *,
    announce: bool,
    can_detach: bool = True,
    printer: TerminalPrinter | None = None,
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
                            if printer is not None:
                                printer.clear()
                            if announce:
                                err.print(
                                    "[yellow]cancelling the run[/] (press Ctrl-C again to detach)"
                                )
                        elif not can_detach:
                            if printer is not None:
                                printer.clear()
                            err.print(
                                "[yellow]cannot detach[/]: the ledger is in this process's "
                                "memory (JOBRUNNER_DATABASE_URL=sqlite://); waiting for the "
                                "cancel to finish"
                            )
                        else:
                            result.detached = True
                            tg.cancel_scope.cancel()

            async def keep_status() -> None:
                assert printer is not None
                while True:
                    await anyio.sleep(0.25)
                    printer.tick()

            tg.start_soon(on_signals)
            tg.start_soon(drive)
            if printer is not None and printer.live:
                tg.start_soon(keep_status)
    except BaseExceptionGroup as group:
        raise sole_error(group) from None  # the caller reports the API or ledger error itself
    finally:
        if printer is not None:
            printer.close()
    return result


def summary(run: Run, attempts: Sequence[Attempt]) -> str:
    """One line: outcome, exit code, duration, machine and region, and why if it says more.

    ``run 01JD7X3G8K2M4N6P8R0T2V4X6Z failed with exit code 1 in 10ms on machine 1bb3ab5345ac40
    in local: cannot place file at '/newtop/y': ...``
    """
    latest = attempts[-1] if attempts else None
    line = f"run {run.id} {styled_state(run.state)}"
    if run.exit_code is not None and run.state in {"succeeded", "failed", "dead"}:
        line += f" with exit code {run.exit_code}"
    if run.duration_s is not None:
        line += f" in {format_duration(run.duration_s)}"
    if latest is not None and latest.machine_id:
        line += f" on machine {latest.machine_id}"
        region = latest.region or run.region
        if region:
            line += f" in {escape(region)}"
    # The run's reason (a timeout, the API's refusal, a file that could not be placed), else
    # the last attempt's: where the failure is shown, not only in `runs show`.
    reason = run.reason or (latest.reason if latest is not None else None)
    if (
        reason
        and run.state != "succeeded"
        and reason not in {f"exit code {run.exit_code}", run.state}
    ):
        line += f": {escape(reason)}"
    return line


def report(run: Run, attempts: Sequence[Attempt], *, as_json: bool) -> int:
    """Print a finished (or still running) run and return the exit code that reports it."""
    if as_json:
        print_json(run_dict(run, attempts))
    else:
        err.print(f"[dim]jobrunner:[/] {summary(run, attempts)}")
    if run.finished_at is None:
        return exitcodes.DETACHED
    return exitcodes.for_outcome(run.state, run.exit_code)
