"""The vocabulary of run states, shared by the job spec, the store, the runner and the CLI.

It lives at the top of the package because nothing it names belongs to one layer: the spec's retry
rules, the ledger's columns and the runner's outcomes all speak it.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ACTIVE_STATES", "ATTEMPT_OUTCOMES", "RUN_STATES", "TERMINAL_STATES", "RunState"]

# A run moves pending -> creating -> starting -> running -> one terminal state; a retry moves it
# back to pending (with next_attempt_at set) and a new attempt begins.
ACTIVE_STATES: frozenset[str] = frozenset({"pending", "creating", "starting", "running"})
# How one attempt can end. A run's terminal state is its last attempt's outcome, except for a
# queued run that used up its attempts without succeeding: that one ends in "dead".
ATTEMPT_OUTCOMES: frozenset[str] = frozenset(
    {
        "succeeded",
        "failed",
        "timed_out",
        "cancelled",
        "oom_killed",
        "lost",
        "create_failed",
    }
)
TERMINAL_STATES: frozenset[str] = ATTEMPT_OUTCOMES | {"dead"}
RUN_STATES: frozenset[str] = ACTIVE_STATES | TERMINAL_STATES


class RunState(StrEnum):
    """A run's state, typed (it compares equal to the plain strings stored in the ledger)."""

    PENDING = "pending"
    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    OOM_KILLED = "oom_killed"
    LOST = "lost"
    CREATE_FAILED = "create_failed"
    DEAD = "dead"

    @property
    def is_finished(self) -> bool:
        return self.value in TERMINAL_STATES
