"""Copies a machine's log lines from the logs API into the run ledger while the run goes.

Lines are stored as they arrive, so they outlive the machine. After the machine exits the
copier keeps polling for a grace period, because the logs API can lag behind the machine (flyctl
waits up to 20 s after a release command). Re-reading a page never duplicates a line: the store
dedupes on the entry id.

Paging starts from a token made from the attempt's creation time (a ``next_token`` is a Unix
nanosecond timestamp, fly-machines-api.md section 10), not from an empty token: without one the
API answers with only the newest 100 lines, so a job that printed more before the first poll (or
while no driver was watching) would lose the rest.

The values of the job's secrets are masked in every stored and streamed line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta

from jobrunner.events import EventHandler, RunEvent
from jobrunner.machines import AsyncMachinesClient
from jobrunner.machines.errors import BadRequest, MachinesError
from jobrunner.machines.logs import poll_log_pages
from jobrunner.machines.models import LogEntry, LogsPage
from jobrunner.store import LogLineIn, Store

logger = logging.getLogger(__name__)

# Start paging this long before the attempt was created, for clock skew between this computer
# and the log platform (lines are filtered by machine, so nothing older can match anyway).
START_MARGIN = timedelta(minutes=5)
MASK = "***"
# Shorter values are not masked: masking "1" or "ok" would garble every line of output.
MIN_MASKED_LENGTH = 4


class SecretMasker:
    """Replaces secret values with ``***`` in text jobrunner stores or prints."""

    def __init__(self, values: Iterable[str]) -> None:
        pieces: set[str] = set()
        for value in values:
            # A multi-line secret (a PEM key) reaches the logs one line at a time.
            for piece in [value, *value.splitlines()]:
                if len(piece.strip()) >= MIN_MASKED_LENGTH:
                    pieces.add(piece)
        # Longest first, so a secret containing another is masked whole.
        self._pieces = sorted(pieces, key=len, reverse=True)

    def mask(self, text: str) -> str:
        for piece in self._pieces:
            if piece in text:
                text = text.replace(piece, MASK)
        return text

    def __repr__(self) -> str:
        return f"SecretMasker({len(self._pieces)} values)"


def token_for(moment: datetime) -> str:
    """A logs API ``next_token`` meaning "lines after ``moment``" (Unix nanoseconds)."""
    delta = moment.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return str((delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000)


def _parse_ts(raw: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return datetime.now(UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _stream_of(entry: LogEntry) -> str:
    return "stderr" if (entry.level or "").lower() in {"error", "stderr"} else "stdout"


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
        app: str | None = None,
        since: datetime | None = None,
        masker: SecretMasker | None = None,
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
        self._app = app
        self._masker = masker or SecretMasker(())
        self._exited_at: float | None = None
        self._next_token: str | None = token_for(since - START_MARGIN) if since else None
        self._made_token = since is not None  # ours, not the API's: dropped if refused
        self._last_page_keys: set[str] = set()

    def machine_exited(self) -> None:
        """Start the drain: keep polling for ``drain_grace`` seconds more, then stop."""
        if self._exited_at is None:
            self._exited_at = time.monotonic()

    async def run(self) -> None:
        """Copy lines until the machine has exited and the grace period has passed.

        Polling, error backoff and giving up are the client's (``poll_log_pages``); this adds
        the fall-back from our own start token and stops quietly when logs are unavailable,
        since a run must not fail for want of its logs.
        """
        while True:
            try:
                async for page in poll_log_pages(
                    self._fetch,
                    next_token=self._next_token,
                    poll_interval=self._poll,
                    until=self._drained,
                ):
                    self._made_token = False  # the API took our token; its own come next
                    await self._save(page.entries)
                return
            except BadRequest as exc:
                if not self._made_token:
                    logger.warning("logs for machine %s unavailable: %s", self._machine_id, exc)
                    return
                # A logs API that does not take a timestamp as a token: page from its default.
                logger.info("logs API refused a start token (%s); paging from its default", exc)
                self._next_token, self._made_token = None, False
            except MachinesError as exc:  # 401/404, or too many errors in a row
                logger.warning("logs for machine %s unavailable: %s", self._machine_id, exc)
                return

    async def _fetch(self, token: str) -> LogsPage:
        return await self._client.get_logs(
            instance=self._machine_id, next_token=token, app=self._app
        )

    def _drained(self) -> bool:
        return self._exited_at is not None and time.monotonic() - self._exited_at >= self._grace

    async def _save(self, entries: list[LogEntry]) -> None:
        lines = [
            LogLineIn(
                # Without an id, the store derives one from the time, stream and whole text.
                entry_id=e.id or None,
                ts=_parse_ts(e.timestamp),
                stream=_stream_of(e),
                message=self._masker.mask(e.message),
            )
            for e in entries
        ]
        await self._to_thread(self._store.add_logs, self._run_id, self._attempt, lines)
        # Pages may overlap at their edges; a line is streamed to the caller once.
        keys = {line.key() for line in lines}
        fresh = [line for line in lines if line.key() not in self._last_page_keys]
        self._last_page_keys = keys
        for line in fresh:
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
