"""Reading the Fly logs API: parsing its JSON:API pages and following new lines as flyctl does.

The logs API lives on ``FLY_API_BASE_URL`` (https://api.fly.io), not on the Machines API:
``GET /api/v1/apps/{app}/logs?next_token=&instance=&region=`` answers
``{"data": [{"id", "attributes": {timestamp, message, level, instance, region, meta}}],
"meta": {"next_token"}}`` (fly-machines-api.md section 10). fly-go decodes it with Go's
case-insensitive key matching, so keys are matched case-insensitively here too.

Following: an empty page means "nothing new": sleep ``poll_interval`` and ask again; after a
non-empty page ask again at once. The last non-empty ``next_token`` is kept. Errors back off
(doubling up to 8 s); 10 errors in a row give up, and 400/401/404 stop at once (a refused
token, a bad credential or app will not fix itself). These follows are not rate limited by the
client (see ratelimit.py). The run ledger's log copier (jobrunner.logsync) uses the same loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from jobrunner.machines._requests import app_path
from jobrunner.machines.clock import SYSTEM_CLOCK, Clock
from jobrunner.machines.errors import BadRequest, MachinesError, NotFound, Unauthorized
from jobrunner.machines.models import LogEntry, LogsPage

__all__ = [
    "MAX_CONSECUTIVE_ERRORS",
    "follow_log_pages",
    "logs_path",
    "parse_logs_page",
    "poll_log_pages",
]

MAX_CONSECUTIVE_ERRORS = 10
_ERROR_FIRST_DELAY = 0.5
_ERROR_MAX_DELAY = 8.0


def logs_path(app: str) -> str:
    """The logs API path for ``app`` (on the logs base URL, not the Machines one)."""
    return f"/api{app_path(app)}/logs"


def _lower_keys(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        return {}
    return {str(key).lower(): item for key, item in value.items()}


def parse_logs_page(data: Any) -> LogsPage:
    """A ``LogsPage`` from the API's JSON:API document (any key case; odd records tolerated)."""
    document = _lower_keys(data)
    entries: list[LogEntry] = []
    records = document.get("data")
    for record in records if isinstance(records, list) else []:
        if not isinstance(record, Mapping):
            continue
        fields = _lower_keys(record)
        attributes = _lower_keys(fields.get("attributes"))
        attributes.setdefault("timestamp", "")
        attributes.setdefault("message", "")
        if fields.get("id") is not None:
            attributes["id"] = str(fields["id"])
        entries.append(LogEntry.model_validate(attributes))
    token = _lower_keys(document.get("meta")).get("next_token")
    return LogsPage(entries=entries, next_token=str(token) if token not in (None, "") else None)


async def follow_log_pages(
    fetch: Callable[[str], Awaitable[LogsPage]],
    *,
    next_token: str | None,
    poll_interval: float,
    until: Callable[[], bool] | None,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[LogEntry]:
    """Yield log lines as they arrive; ``fetch(token)`` gets one page (see the module docstring)."""
    async for page in poll_log_pages(
        fetch, next_token=next_token, poll_interval=poll_interval, until=until, clock=clock
    ):
        for entry in page.entries:
            yield entry


async def poll_log_pages(
    fetch: Callable[[str], Awaitable[LogsPage]],
    *,
    next_token: str | None,
    poll_interval: float,
    until: Callable[[], bool] | None,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[LogsPage]:
    """Yield each non-empty page as it arrives, so a caller can store a page in one write.

    Stops when ``until()`` is true after an empty page; raises after too many errors in a row,
    or at once on 400/401/404 (a refused token, a bad credential or app will not fix itself).
    A non-empty page whose token did not move on is not asked for again at once: the API
    would keep answering it, and the loop would spin.
    """
    token = next_token or ""
    errors = 0
    error_delay = _ERROR_FIRST_DELAY
    while True:
        try:
            page = await fetch(token)
        except (BadRequest, Unauthorized, NotFound):
            raise
        except MachinesError:
            errors += 1
            if errors >= MAX_CONSECUTIVE_ERRORS:
                raise
            await clock.sleep(error_delay)
            error_delay = min(error_delay * 2, _ERROR_MAX_DELAY)
            continue
        errors = 0
        error_delay = _ERROR_FIRST_DELAY
        advanced = bool(page.next_token) and page.next_token != token
        if page.next_token:
            token = page.next_token
        if page.entries:
            yield page
            if advanced:
                continue
        if until is not None and until():
            return
        await clock.sleep(poll_interval)
