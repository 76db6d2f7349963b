"""The vocabulary of run states, shared by the job spec, the store, the runner and the CLI.

It lives at the top of the package because nothing it names belongs to one layer: the spec's retry
rules, the ledger's columns and the runner's outcomes all speak it.
"""

from __future__ import annotations

__all__ = ["ACTIVE_STATES", "RUN_STATES", "TERMINAL_STATES"]

# A run moves pending -> creating -> starting -> running -> one terminal state; a retry moves it
# back to pending (with next_attempt_at set) and a new attempt begins.
ACTIVE_STATES: frozenset[str] = frozenset({"pending", "creating", "starting", "running"})
TERMINAL_STATES: frozenset[str] = frozenset(
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
RUN_STATES: frozenset[str] = ACTIVE_STATES | TERMINAL_STATES
