"""Machine output, captured line by line and served in the shape of Fly's logs API (section 10).

Lines arrive from the supervisor's ``on_output`` callback on the event loop. They are buffered and
written to the database in batches (a chatty process must not cost one transaction per line);
every read flushes first, so a reader always sees every line captured so far.

Each entry's token is its capture time in Unix nanoseconds, made strictly increasing across the
server so that "entries after token T" never skips or repeats a line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from jobrunner.local.api.errors import bad_request
from jobrunner.local.state.database import LogRow, StateDatabase

__all__ = ["PAGE_SIZE", "LogStore"]

PAGE_SIZE = 100
_FLUSH_EVERY_LINES = 500
_LEVELS = {"stdout": "info", "stderr": "error"}
_MAX_TOKEN = 2**63 - 1


class LogStore:
    """Buffers captured lines, assigns their tokens and answers logs API queries."""

    def __init__(self, store: StateDatabase, flush_interval: float = 0.2) -> None:
        self._store = store
        self._buffer: list[LogRow] = []
        self._last_token = store.last_log_token()
        self._flush_interval = flush_interval
        #: The shim record every buffered line is covered by (see shim_client); stored with them.
        self.position: Callable[[], int | None] = lambda: None

    def writer(self, app: str, instance: str, region: str) -> Callable[[str, str, datetime], None]:
        """An ``on_output(stream, line, when)`` callback that records lines for one machine."""

        def on_output(stream: str, line: str, when: datetime) -> None:
            self.append(app, instance, region, stream, line, when)

        return on_output

    def append(
        self, app: str, instance: str, region: str, stream: str, line: str, when: datetime
    ) -> None:
        token = max(_nanoseconds(when), self._last_token + 1)
        self._last_token = token
        level = _LEVELS.get(stream, "info")
        self._buffer.append((token, app, instance, region, level, line.rstrip("\r\n")))
        if len(self._buffer) >= _FLUSH_EVERY_LINES:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            rows, self._buffer = self._buffer, []
            self._store.add_logs(rows, self.position())

    async def run_flusher(self) -> None:
        """Flush the buffer every ``flush_interval`` seconds until cancelled."""
        try:
            while True:
                await asyncio.sleep(self._flush_interval)
                self.flush()
        finally:
            self.flush()

    def page(
        self, app: str, *, instance: str | None, region: str | None, next_token: str | None
    ) -> dict[str, Any]:
        """One JSON:API page: entries strictly after ``next_token``, else the newest 100."""
        after = _parse_token(next_token)
        self.flush()
        rows = self._store.query_logs(
            app, instance=instance, region=region, after=after, limit=PAGE_SIZE
        )
        data = [_entry(row) for row in rows]
        token = str(rows[-1][0]) if rows else (next_token or "")
        return {"data": data, "meta": {"next_token": token}}

    def purge_before(self, when: datetime) -> None:
        self.flush()
        self._store.delete_logs_before(_nanoseconds(when))


def _parse_token(value: str | None) -> int | None:
    if value is None or value.strip() == "":
        return None
    try:
        token = int(value)
    except ValueError:
        raise bad_request(
            f"next_token {value!r} is not a token: pass back meta.next_token from the last page"
        ) from None
    if not 0 <= token <= _MAX_TOKEN:  # SQLite integers are 64-bit: a larger one cannot be a token
        raise bad_request(
            f"next_token {value!r} is out of range: pass back meta.next_token from the last page"
        )
    return token


def _nanoseconds(when: datetime) -> int:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _timestamp(token: int) -> str:
    seconds, nanos = divmod(token, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{nanos:09d}Z"


def _entry(row: LogRow) -> dict[str, Any]:
    token, _app, instance, region, level, message = row
    return {
        "id": str(token),
        "type": "logs",
        "attributes": {
            "timestamp": _timestamp(token),
            "message": message,
            "level": level,
            "instance": instance,
            "region": region,
            "meta": {"instance": instance, "region": region, "event": {"provider": "app"}},
        },
    }
