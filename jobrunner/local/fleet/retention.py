"""Forgetting old things: destroyed machines after the retention period, log lines after a week.

Fly keeps destroyed machines readable "for a while" (flyctl and cron-manager rely on about
48 h) so that their exit events can still be read; the local backend does the same, with the
period configurable. Time is read from the injectable clock.
"""

from __future__ import annotations

from datetime import timedelta

from jobrunner.clock import Clock
from jobrunner.local.fleet.registry import Registry
from jobrunner.local.state.logstore import LogStore

__all__ = ["purge_expired", "run_purger"]
_SWEEP = timedelta(minutes=1)


def purge_expired(
    registry: Registry, logs: LogStore, retention: timedelta, log_retention: timedelta
) -> list[str]:
    """Forget destroyed machines older than ``retention``; return their ids."""
    now = registry.now()
    expired = [
        m.id
        for m in registry.machines.values()
        if m.state == "destroyed"
        and m.destroyed_at is not None
        and m.destroyed_at + retention <= now
    ]
    for machine_id in expired:
        registry.forget(machine_id)
    logs.purge_before(now - log_retention)
    return expired


async def run_purger(
    registry: Registry,
    logs: LogStore,
    clock: Clock,
    retention: timedelta,
    log_retention: timedelta,
) -> None:
    """Sweep once a minute of clock time until cancelled."""
    while True:
        purge_expired(registry, logs, retention, log_retention)
        await clock.sleep(max(min(_SWEEP, retention).total_seconds(), 1.0))
