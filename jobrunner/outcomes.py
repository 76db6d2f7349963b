"""How an attempt ended: the machine's exit event, read into one of the run's outcomes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobrunner.machines.models import Machine
from jobrunner.states import TERMINAL_STATES

__all__ = ["TERMINAL", "AttemptResult", "read_outcome"]

TERMINAL = TERMINAL_STATES


@dataclass(frozen=True)
class AttemptResult:
    """One attempt's outcome and what the exit event said about it."""

    outcome: str
    exit_code: int | None = None
    reason: str | None = None
    oom_killed: bool = False
    signal: int | None = None
    requested_stop: bool = False
    capacity: bool = False  # create failed for lack of capacity (retry rule `capacity`)


def read_outcome(
    machine_id: str,
    machine: Machine | None,
    forced: str | None,
    *,
    timeout: float | None = None,
) -> AttemptResult:
    """The outcome of an attempt whose machine is ``machine`` (None: the API no longer knows it).

    ``forced`` is ``"timed_out"`` or ``"cancelled"`` when the runner stopped the machine itself.
    A timeout is judged on the machine's own events: when its exit event shows it ended by
    itself within ``timeout`` seconds of its start (a driver that came back late to a job that
    had finished in time), its own outcome stands.
    """
    if forced == "timed_out" and machine is not None and _exited_in_time(machine, timeout):
        forced = None
    if machine is None:
        return AttemptResult(
            forced or "lost", reason=f"machine {machine_id} vanished without an exit event"
        )
    details = machine.exit_event()
    exit_code = machine.exit_code
    common: dict[str, Any] = {
        "exit_code": exit_code,
        "oom_killed": bool(details and details.oom_killed),
        "signal": details.signal if details else None,
        "requested_stop": bool(details and details.requested_stop),
    }
    if forced == "timed_out":
        return AttemptResult("timed_out", reason="the job exceeded its timeout", **common)
    if forced == "cancelled":
        return AttemptResult("cancelled", reason="cancelled by the user", **common)
    if machine.last_exit() is None:
        return AttemptResult(
            "lost", reason=f"machine {machine_id} is {machine.state} without an exit event"
        )
    if details is not None and details.oom_killed:
        return AttemptResult("oom_killed", reason="the job ran out of memory", **common)
    if details is not None and details.error:
        return AttemptResult("failed", reason=details.error, **common)
    if exit_code == 0:
        return AttemptResult("succeeded", **common)
    return AttemptResult("failed", reason=f"exit code {exit_code}", **common)


def _exited_in_time(machine: Machine, timeout: float | None) -> bool:
    exit_event, start = machine.last_exit(), machine.last_start()
    if exit_event is None or start is None or timeout is None:
        return False
    details = exit_event.exit_event()
    if details is not None and details.requested_stop:
        return False  # we (or someone) stopped it: that was the timeout's doing
    return (exit_event.timestamp - start.timestamp) / 1000 <= timeout
