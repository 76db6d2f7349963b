"""Exit codes of the ``jobrunner`` command, documented in docs/cli.md.

``run`` and ``wait`` exit with the job's own exit code when the job ran and failed; the outcomes
where the job has no exit code of its own use the codes below (after sysexits.h and `timeout(1)`).
"""

from __future__ import annotations

OK = 0
ERROR = 1  # an internal error (a bug); for run/wait also the job's own exit code 1
USAGE = 2  # bad flags or arguments (click's own code), including an unknown run id
INVALID_JOB = 65  # a job file or --env value does not validate (EX_DATAERR)
CREATE_FAILED = 69  # the machine could not be created (EX_UNAVAILABLE)
LOST = 70  # the machine vanished without an exit event
# The Machines API, the local backend or the ledger failed (EX_IOERR). Not 1: for run/wait that
# is a job's exit code, and a script must tell "the job failed" from "jobrunner could not tell".
BACKEND_ERROR = 74
DETACHED = 75  # a second Ctrl-C detached; the run goes on (EX_TEMPFAIL)
CONFIG = 78  # missing or invalid configuration, e.g. no FLY_APP (EX_CONFIG)
TIMED_OUT = 124  # the job exceeded its timeout (like timeout(1))
CANCELLED = 130  # the run was cancelled (128 + SIGINT)
OOM_KILLED = 137  # the job ran out of memory (128 + SIGKILL)

OUTCOME_CODES = {
    "timed_out": TIMED_OUT,
    "cancelled": CANCELLED,
    "oom_killed": OOM_KILLED,
    "create_failed": CREATE_FAILED,
    "lost": LOST,
}


def for_outcome(state: str, exit_code: int | None) -> int:
    """The process exit code that reports a finished run's outcome."""
    if state == "succeeded":
        return OK
    if state in {"failed", "dead"}:  # dead: a queued run whose every attempt failed
        return exit_code if exit_code and 0 < exit_code < 256 else ERROR
    return OUTCOME_CODES.get(state, ERROR)
