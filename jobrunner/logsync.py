"""Copies a machine's log lines from the logs API into the run ledger while the run goes.

Lines are stored as they arrive, so they outlive the machine. After the machine exits the
copier keeps polling for a grace period, because the logs API can lag behind the machine (flyctl
waits up to 20 s after a release command). Re-reading a page never duplicates a line: the store
dedupes on the entry id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import anyio

from jobrunner.events import EventHandler, RunEvent
from jobrunner.machines import AsyncMachinesClient
from jobrunner.machines.errors import MachinesAPIError, MachinesError, NotFound, Unauthorized
from jobrunner.machines.models import LogEntry
from jobrunner.store import LogLineIn, Store

logger = logging.getLogger(__name__)


def _parse_ts(raw: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return datetime.now(UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _stream_of(entry: LogEntry) -> str:
    return "stderr" if (entry.level or "").lower() in {"error", "stderr"} else "stdout"


def _entry_id(entry: LogEntry) -> str:
    return entry.id or f"{entry.timestamp}|{entry.message}"


class LogCopier:
    """Polls the logs API for one attempt's machine and writes new lines to the store."""

    def __init__(
        self,
        client: AsyncMachinesClient,
        store: Store,
        *,
        run_id: str,
        attempt: int,
        machine_id: str,
        on_event: EventHandler,
        poll_interval: float,
        drain_grace: float,
        to_thread: Callable[..., Awaitable[object]],
    ) -> None:
        self._client = client
        self._store = store
        self._run_id = run_id
        self._attempt = attempt
        self._machine_id = machine_id
        self._on_event = on_event
        self._poll = poll_interval
        self._grace = drain_grace
        self._to_thread = to_thread
        self._exited_at: float | None = None
        self._next_token: str | None = None

    def machine_exited(self) -> None:
        """Start the drain: keep polling for ``drain_grace`` seconds more, then stop."""
        if self._exited_at is None:
            self._exited_at = time.monotonic()

    async def run(self) -> None:
        """Copy lines until the machine has exited and the grace period has passed."""
        errors = 0
        while True:
            try:
                page = await self._client.get_logs(
                    instance=self._machine_id, next_token=self._next_token
                )
                errors = 0
            except (NotFound, Unauthorized) as exc:
                logger.warning("logs for machine %s unavailable: %s", self._machine_id, exc)
                return
            except (MachinesAPIError, MachinesError) as exc:
                errors += 1
                if errors >= 10:
                    logger.warning("giving up on logs for %s: %s", self._machine_id, exc)
                    return
                await anyio.sleep(min(8.0, self._poll * 2**errors))
                continue
            if page.entries:
                await self._save(page.entries)
                if page.next_token:
                    self._next_token = page.next_token
                continue
            if self._exited_at is not None and time.monotonic() - self._exited_at >= self._grace:
                return
            await anyio.sleep(self._poll)

    async def _save(self, entries: list[LogEntry]) -> None:
        lines = [
            LogLineIn(
                entry_id=_entry_id(e),
                ts=_parse_ts(e.timestamp),
                stream=_stream_of(e),
                message=e.message,
            )
            for e in entries
        ]
        await self._to_thread(self._store.add_logs, self._run_id, self._attempt, lines)
        for line in lines:
            self._on_event(
                RunEvent(
                    kind="log",
                    run_id=self._run_id,
                    attempt=self._attempt,
                    machine_id=self._machine_id,
                    stream=line.stream,
                    message=line.message,
                    timestamp=line.ts,
                )
            )
