"""What the runner tells its caller while a run goes: state changes, output lines, notices.

The CLI renders these as progress and streamed output; Python callers may log them. Handlers are
called on the event loop and must not block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

EventKind = Literal["state", "attempt", "log", "retry", "notice"]


@dataclass(frozen=True)
class RunEvent:
    kind: EventKind
    run_id: str
    message: str = ""
    state: str | None = None
    attempt: int | None = None
    machine_id: str | None = None
    stream: str | None = None
    timestamp: datetime | None = None


EventHandler = Callable[[RunEvent], None]


def ignore_events(event: RunEvent) -> None:
    """The default handler: drop everything."""
