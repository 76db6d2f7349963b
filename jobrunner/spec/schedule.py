"""A job's schedule keys: when it fires (a cron expression, or one of Fly's native intervals),
in which time zone, and what happens on overlaps, late starts and downtime.

The keys live at the top of the job file, next to what they schedule::

    schedule = "*/15 * * * *"     # or "@hourly", or "*/10 * * * * *" (seconds first)
    timezone = "Europe/Berlin"    # IANA name; default UTC
    concurrency = "forbid"        # allow | forbid | replace, while an earlier run still goes
    starting_deadline = "2m"      # a fire not started within this long of its time is skipped
    catch_up = "latest"           # after downtime: none | latest | all (at most catch_up_limit)
    jitter = "30s"                # spread starts by up to this long, the same for each tick
    paused = false
    history_limit = 100           # finished runs of the schedule to keep

``native = true`` with ``schedule = "hourly" | "daily" | "weekly" | "monthly"`` makes the job one
persistent Fly machine with that ``schedule`` (``jobrunner schedules sync``), so no jobrunner
process has to stay up. Checks that need the whole job live here; docs/scheduling.md explains each
key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jobrunner.spec.problems import MISSING, Problem

__all__ = [
    "CATCH_UP",
    "CONCURRENCY",
    "NATIVE_INTERVALS",
    "SCHEDULE_KEYS",
    "schedule_problems",
]

NATIVE_INTERVALS = ("hourly", "daily", "weekly", "monthly")
CONCURRENCY = ("allow", "forbid", "replace")
CATCH_UP = ("none", "latest", "all")
# The keys that mean something only with a schedule.
SCHEDULE_KEYS = (
    "timezone",
    "concurrency",
    "starting_deadline",
    "catch_up",
    "catch_up_limit",
    "jitter",
    "paused",
    "history_limit",
    "native",
)


def schedule_problems(data: Mapping[str, Any], file: str | None) -> list[Problem]:
    """What is wrong with the schedule keys of a job's raw table, taken together."""
    schedule = data.get("schedule")
    native = data.get("native", False)
    problems: list[Problem] = []
    if schedule is None:
        for key in SCHEDULE_KEYS:
            if key in data and key != "native":
                problems.append(
                    Problem(
                        file,
                        key,
                        data[key],
                        "means something only for a scheduled job, and this job has no schedule",
                        f'add schedule = "0 * * * *" (or remove {key})',
                    )
                )
        if native is True:
            problems.append(
                Problem(
                    file,
                    "native",
                    native,
                    "a native schedule needs schedule = one of " + ", ".join(NATIVE_INTERVALS),
                    'add schedule = "daily" (or remove native)',
                )
            )
        return problems
    if not isinstance(schedule, str):
        return problems  # the field check reports the type
    if native is True:
        if schedule not in NATIVE_INTERVALS:
            problems.append(
                Problem(
                    file,
                    "schedule",
                    schedule,
                    "a native schedule (native = true) takes one of Fly's intervals: "
                    + ", ".join(NATIVE_INTERVALS)
                    + "; Fly machines cannot run on a cron expression",
                    'write schedule = "hourly" (or set native = false for cron, run by '
                    "`jobrunner scheduler`)",
                )
            )
        for key in (
            "timezone",
            "concurrency",
            "starting_deadline",
            "catch_up",
            "jitter",
            "timeout",
        ):
            if key in data:
                problems.append(
                    Problem(
                        file,
                        key,
                        data[key],
                        "does not apply to a native schedule (Fly starts and watches the machine "
                        "itself; nothing would enforce it)",
                        f"remove {key}, or set native = false",
                    )
                )
        return problems
    if schedule in NATIVE_INTERVALS:
        problems.append(
            Problem(
                file,
                "schedule",
                schedule,
                f"{schedule!r} is one of Fly's native intervals, but native is not set",
                f'set native = true, or write a cron expression such as "@{schedule}"',
            )
        )
        return problems
    from jobrunner.cron import CronError, CronSchedule

    timezone = data.get("timezone", "UTC")
    try:
        CronSchedule.parse(schedule, timezone if isinstance(timezone, str) else "UTC")
    except CronError as exc:
        key = "timezone" if exc.timezone is not None else "schedule"
        value = timezone if key == "timezone" else schedule
        problems.append(
            Problem(
                file,
                key,
                value if value is not None else MISSING,
                str(exc),
                'write e.g. schedule = "*/15 * * * *" (minute hour day month weekday), '
                '"@daily", or six fields with seconds first; timezone = "Europe/Berlin"',
            )
        )
    return problems
