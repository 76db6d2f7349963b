"""Turning runs into JSON for scripts and into tables for people."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.table import Table

from jobrunner.durations import format_duration
from jobrunner.store import Attempt, Run, Transition

STATE_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "timed_out": "yellow",
    "cancelled": "magenta",
    "oom_killed": "red",
    "lost": "red",
    "create_failed": "red",
    "running": "cyan",
    "starting": "cyan",
    "creating": "cyan",
    "pending": "dim",
}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def attempt_dict(a: Attempt) -> dict[str, Any]:
    return {
        "number": a.number,
        "machine_id": a.machine_id,
        "instance_id": a.instance_id,
        "region": a.region,
        "state": a.state,
        "outcome": a.outcome,
        "exit_code": a.exit_code,
        "oom_killed": a.oom_killed,
        "signal": a.signal,
        "requested_stop": a.requested_stop,
        "reason": a.reason,
        "created_at": _iso(a.created_at),
        "started_at": _iso(a.started_at),
        "finished_at": _iso(a.finished_at),
    }


def run_dict(run: Run, attempts: Sequence[Attempt] = ()) -> dict[str, Any]:
    """The JSON shape of a run, stable for scripts (documented in docs/cli.md)."""
    latest = attempts[-1] if attempts else None
    terminal = run.finished_at is not None
    return {
        "id": run.id,
        "job": run.job_name,
        "state": run.state,
        "outcome": run.state if terminal else None,
        "exit_code": run.exit_code,
        "reason": run.reason,
        "machine_id": latest.machine_id if latest else None,
        "region": (latest.region if latest else None) or run.region,
        "attempts": run.attempts,
        "max_attempts": run.max_attempts,
        "backend": run.backend,
        "app": run.app,
        "trigger": run.trigger,
        "duration_s": round(run.duration_s, 3) if run.duration_s is not None else None,
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
    }


def _when(moment: datetime) -> str:
    """Time of day for today's runs, the date for older ones (keeps the table narrow)."""
    local = moment.astimezone()
    if local.date() == datetime.now().astimezone().date():
        return local.strftime("%H:%M:%S")
    return local.strftime("%Y-%m-%d")


def styled_state(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def runs_table(rows: Sequence[tuple[Run, Sequence[Attempt]]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("RUN", "JOB", "STATE", "EXIT", "MACHINE", "DURATION", "CREATED"):
        table.add_column(column)
    for run, attempts in rows:
        data = run_dict(run, attempts)
        table.add_row(
            run.short_id,
            run.job_name,
            styled_state(run.state),
            "" if run.exit_code is None else str(run.exit_code),
            data["machine_id"] or "",
            format_duration(run.duration_s) if run.duration_s is not None else "",
            _when(run.created_at),
        )
    return table


def run_detail(run: Run, attempts: Sequence[Attempt], transitions: Sequence[Transition]) -> Table:
    data = run_dict(run, attempts)
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in data.items():
        if value is None:
            continue
        table.add_row(key, styled_state(str(value)) if key in ("state", "outcome") else str(value))
    for a in attempts:
        summary = f"{a.outcome or a.state} machine={a.machine_id or '-'} exit={a.exit_code}"
        table.add_row(f"attempt {a.number}", summary + (f" ({a.reason})" if a.reason else ""))
    for t in transitions:
        table.add_row(
            t.at.strftime("%H:%M:%S.%f")[:-3],
            f"{t.from_state or '-'} -> {t.to_state}" + (f"  {t.reason}" if t.reason else ""),
        )
    return table
