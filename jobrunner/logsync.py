"""What every copy of log lines into the ledger shares: secret masking, and reading the logs API.

The values of a job's secrets are masked (``***``) in every stored and streamed line. Paging
starts from a token made from the attempt's creation time (a ``next_token`` is a Unix nanosecond
timestamp, fly-machines-api.md section 10), not from an empty token: without one the API answers
with only the newest 100 lines, so a job that printed more before the first poll would lose the
rest. The copying itself is :mod:`jobrunner.logfanout`'s: one poll loop per app.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from jobrunner.machines.models import LogEntry

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


def parse_ts(raw: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return datetime.now(UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def stream_of(entry: LogEntry) -> str:
    return "stderr" if (entry.level or "").lower() in {"error", "stderr"} else "stdout"
