"""Turning runs into JSON for scripts and into tables for people.

Runs come from the store (``jobrunner.store.Run`` ...) or from the CLI's light read path
(``jobrunner.cli.ledger_read``); both have the attributes the protocols below name.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from jobrunner.cli.tables import Cell, color_enabled, format_table
from jobrunner.durations import format_duration


class Run(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def job_name(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def exit_code(self) -> int | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def region(self) -> str | None: ...
    @property
    def attempts(self) -> int: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def backend(self) -> str: ...
    @property
    def app(self) -> str | None: ...
    @property
    def trigger(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def finished_at(self) -> datetime | None: ...
    @property
    def short_id(self) -> str: ...
    @property
    def duration_s(self) -> float | None: ...


class Attempt(Protocol):
    @property
    def number(self) -> int: ...
    @property
    def machine_id(self) -> str | None: ...
    @property
    def instance_id(self) -> str | None: ...
    @property
    def region(self) -> str | None: ...
    @property
    def state(self) -> str: ...
    @property
    def outcome(self) -> str | None: ...
    @property
    def exit_code(self) -> int | None: ...
    @property
    def oom_killed(self) -> bool | None: ...
    @property
    def signal(self) -> int | None: ...
    @property
    def requested_stop(self) -> bool | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def finished_at(self) -> datetime | None: ...


class Transition(Protocol):
    @property
    def attempt_number(self) -> int | None: ...
    @property
    def from_state(self) -> str | None: ...
    @property
    def to_state(self) -> str: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def at(self) -> datetime: ...


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
    """``state`` in rich markup with its colour (for messages printed through rich)."""
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def state_cell(state: str) -> Cell:
    return (state, STATE_STYLE.get(state))


def runs_table(rows: Sequence[tuple[Run, Sequence[Attempt]]], *, color: bool | None = None) -> str:
    """The runs as a table (complete cells, no trailing spaces; colour only on a terminal)."""
    body: list[list[Cell]] = []
    for run, attempts in rows:
        data = run_dict(run, attempts)
        body.append(
            [
                run.short_id,
                run.job_name,
                state_cell(run.state),
                "" if run.exit_code is None else str(run.exit_code),
                data["machine_id"] or "",
                format_duration(run.duration_s) if run.duration_s is not None else "",
                _when(run.created_at),
            ]
        )
    headers = ("RUN", "JOB", "STATE", "EXIT", "MACHINE", "DURATION", "CREATED")
    return format_table(headers, body, color=color_enabled() if color is None else color)


def run_detail(
    run: Run,
    attempts: Sequence[Attempt],
    transitions: Sequence[Transition],
    *,
    color: bool | None = None,
) -> str:
    """A run, one ``key  value`` line per field, attempt and state change."""
    paint_on = color_enabled() if color is None else color
    data = run_dict(run, attempts)
    body: list[list[Cell]] = []
    for key, value in data.items():
        if value is None:
            continue
        shown = state_cell(str(value)) if key in ("state", "outcome") else str(value)
        body.append([(key, "bold"), shown])
    for a in attempts:
        summary = f"{a.outcome or a.state} machine={a.machine_id or '-'} exit={a.exit_code}"
        body.append(
            [(f"attempt {a.number}", "bold"), summary + (f" ({a.reason})" if a.reason else "")]
        )
    for t in transitions:
        body.append(
            [
                (t.at.strftime("%H:%M:%S.%f")[:-3], "bold"),
                f"{t.from_state or '-'} -> {t.to_state}" + (f"  {t.reason}" if t.reason else ""),
            ]
        )
    table = format_table(("", ""), body, color=paint_on)
    return table.split("\n", 1)[1]  # no header line
