"""Native ``config.schedule`` (fly-machines-api.md section 4.3): start a stopped machine on time.

Intervals are counted from the machine's creation (Fly's API docs): a ``daily`` machine created
at 10:00 is due at 10:00 every day. Fly calls these intervals fuzzy; here they are exact, with
``monthly`` taken as 30 days. A fire that finds the machine still running is skipped (a machine
cannot be started twice), and fires missed while the server was down are coalesced into one.
Time is read from the injectable clock, so tests can run a month in seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from jobrunner.clock import Clock
from jobrunner.local.fleet.records import MachineRecord
from jobrunner.local.fleet.registry import Registry

__all__ = ["INTERVALS", "ScheduleRunner", "latest_due", "next_due"]

logger = logging.getLogger("jobrunner.local")

INTERVALS = {
    "hourly": timedelta(hours=1),
    "daily": timedelta(days=1),
    "weekly": timedelta(weeks=1),
    "monthly": timedelta(days=30),
}
# The runner re-scans at least this often (clock time), so it notices new scheduled machines
# long before their first interval (an hour at least) is up.
_RESCAN = timedelta(seconds=60)
_STARTABLE = ("created", "stopped", "failed")


def next_due(anchor: datetime, interval: timedelta, fired: datetime | None) -> datetime:
    """The first due time after ``fired`` (or after ``anchor`` when it never fired)."""
    base = fired or anchor
    return anchor + ((base - anchor) // interval + 1) * interval


def latest_due(anchor: datetime, interval: timedelta, now: datetime) -> datetime:
    """The last due time at or before ``now`` (``anchor`` itself when none has passed)."""
    return anchor + ((now - anchor) // interval) * interval


class ScheduleRunner:
    """Starts scheduled machines when their interval comes due."""

    def __init__(
        self, registry: Registry, clock: Clock, start: Callable[[MachineRecord, str], None]
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._start = start

    async def run(self) -> None:
        """Scan and fire until cancelled."""
        while True:
            soonest = self.tick()
            delay = min(soonest - self._clock.now(), _RESCAN) if soonest else _RESCAN
            await self._clock.sleep(max(delay.total_seconds(), 0.0))

    def tick(self) -> datetime | None:
        """Fire every machine that is due now; return the next due time of any machine."""
        now = self._clock.now()
        soonest: datetime | None = None
        for machine in list(self._registry.machines.values()):
            interval = INTERVALS.get(machine.config.schedule or "")
            if interval is None or machine.state in ("destroying", "destroyed"):
                continue
            due = next_due(machine.created_at, interval, machine.schedule_fired_at)
            if due <= now:
                self._fire(machine, latest_due(machine.created_at, interval, now))
                due = next_due(machine.created_at, interval, machine.schedule_fired_at)
            soonest = due if soonest is None else min(soonest, due)
        return soonest

    def _fire(self, machine: MachineRecord, due: datetime) -> None:
        machine.schedule_fired_at = due
        if machine.state in _STARTABLE and not self._registry.runtime(machine).lock.locked():
            self._start(machine, "flyd")
        else:
            logger.info(
                "machine %s: %s run due at %s skipped, the machine is %s",
                machine.id,
                machine.config.schedule,
                due.isoformat(),
                machine.state,
            )
            self._registry.save(machine)
