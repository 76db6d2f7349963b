"""What every copy of log lines into the ledger shares: secret masking, and reading the logs API.

The values of a job's secrets are masked (``***``) in every stored and streamed line. Paging
starts from a token made from the attempt's creation time (a ``next_token`` is a Unix nanosecond
timestamp, fly-machines-api.md section 10), not from an empty token: without one the API answers
with only the newest 100 lines, so a job that printed more before the first poll would lose the
rest. The copying itself is :mod:`jobrunner.logfanout`'s: one poll loop per app.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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

    @property
    def pieces(self) -> list[str]:
        """The texts masked, longest first (never shown: they are secrets)."""
        return list(self._pieces)

    def mask(self, text: str) -> str:
        for piece in self._pieces:
            if piece in text:
                text = text.replace(piece, MASK)
        return text

    def __repr__(self) -> str:
        return f"SecretMasker({len(self._pieces)} values)"


# A line whose end could be the beginning of a secret is held back this long (at most) for the
# next line of its stream, which may hold the secret's rest: the local backend and Fly's log
# pipeline cut lines longer than 64 KiB into several, anywhere, even inside a secret.
HOLD_SECONDS = 3.0
# Entries already masked, remembered (per machine) so that one read twice (a page edge, a
# catch-up, a retried store) comes out exactly as the first time.
REMEMBERED_ENTRIES = 4096


def _intervals(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    for piece in pieces:
        start = text.find(piece)
        while start != -1:
            found.append((start, start + len(piece)))
            start = text.find(piece, start + 1)
    return found


def _render(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with every span replaced by ``MASK`` (overlapping spans as one)."""
    if not spans:
        return text
    out: list[str] = []
    position = 0
    end = -1
    for start, stop in sorted(spans):
        if start < end:  # overlaps the span being masked: extend it
            end = max(end, stop)
            continue
        if end >= 0:
            out.append(MASK)
            position = end
        out.append(text[position:start])
        position, end = start, stop
    out.append(MASK)
    out.append(text[end:])
    return "".join(out)


@dataclass
class _Held:
    entry: LogEntry
    key: str
    since: float  # monotonic
    spans: list[tuple[int, int]]  # masked already: its head continued the line before it


@dataclass
class _StreamState:
    held: _Held | None = None
    tail: str = ""  # the end of the last line let go, to mask the head of the next one


class StreamMasker:
    """Masks one machine's log lines, a secret included even when it was cut across two lines.

    The rule: a secret (of ``MIN_MASKED_LENGTH`` or more characters) is masked wherever it
    appears in a line, and also where a line of a stream (stdout or stderr) ends with the
    beginning of a secret and the next line of that stream begins with its rest: then both
    parts are masked. A line whose end could begin a secret is held back until the next line
    of its stream arrives, for at most ``hold_seconds`` (or until :meth:`release` with
    ``everything``). A line let go without its continuation keeps that end as printed (a
    secret's first characters alone), but should the rest still come, the rest is masked.

    Feeding an entry again (by id, else by time, stream and text) gives the same masked text as
    the first time, so entries may be read more than once. Returns ``(entry, masked text)``.
    """

    def __init__(self, masker: SecretMasker, *, hold_seconds: float = HOLD_SECONDS) -> None:
        self._pieces = masker.pieces
        self._hold = hold_seconds
        self._longest = max((len(p) for p in self._pieces), default=0)
        # For each piece: the lengths k (1 <= k < len) of its beginnings ending in character c.
        self._starts: dict[str, list[tuple[str, int]]] = {}
        for piece in self._pieces:
            for k in range(1, len(piece)):
                self._starts.setdefault(piece[k - 1], []).append((piece, k))
        self._streams: dict[str, _StreamState] = {}
        self._done: OrderedDict[str, str] = OrderedDict()  # key -> masked text
        self._held_keys: set[str] = set()

    def __repr__(self) -> str:
        return f"StreamMasker({len(self._pieces)} values, {len(self._held_keys)} held)"

    @property
    def holding(self) -> bool:
        return bool(self._held_keys)

    def expired(self, now: float) -> bool:
        """Whether a held line has waited its ``hold_seconds``."""
        return any(
            state.held is not None and now - state.held.since >= self._hold
            for state in self._streams.values()
        )

    def feed(self, entries: Iterable[LogEntry], now: float) -> list[tuple[LogEntry, str]]:
        """The entries that can go now, masked, in order (some may be held for later)."""
        ready: list[tuple[LogEntry, str]] = []
        for entry in entries:
            key = _entry_key(entry)
            if key in self._held_keys:
                continue  # read again while held: it goes when its continuation comes
            done = self._done.get(key)
            if done is not None:
                ready.append((entry, done))
                continue
            if not self._pieces:
                self._remember(key, entry.message)
                ready.append((entry, entry.message))
                continue
            ready.extend(self._next_line(entry, key, now))
        return ready

    def release(self, now: float, *, everything: bool = False) -> list[tuple[LogEntry, str]]:
        """Let go of the held lines that waited long enough (all of them with ``everything``)."""
        out: list[tuple[LogEntry, str]] = []
        for state in self._streams.values():
            held = state.held
            if held is not None and (everything or now - held.since >= self._hold):
                out.append(self._let_go(state, held, []))
        return out

    def _next_line(self, entry: LogEntry, key: str, now: float) -> list[tuple[LogEntry, str]]:
        state = self._streams.setdefault(stream_of(entry), _StreamState())
        text = entry.message
        out: list[tuple[LogEntry, str]] = []
        head: list[tuple[int, int]] = []
        previous = state.held.entry.message if state.held is not None else state.tail
        if previous:
            tail_spans, head = self._across(previous, text)
            if state.held is not None:
                out.append(self._let_go(state, state.held, tail_spans))
        held = _Held(entry, key, now, head)
        if self._may_begin_secret(text):
            state.held = held
            self._held_keys.add(key)
        else:
            out.append(self._let_go(state, held, []))
        return out

    def _let_go(
        self, state: _StreamState, held: _Held, tail_spans: list[tuple[int, int]]
    ) -> tuple[LogEntry, str]:
        text = held.entry.message
        masked = _render(text, _intervals(text, self._pieces) + held.spans + tail_spans)
        if state.held is held:
            state.held = None
        self._held_keys.discard(held.key)
        state.tail = text[-self._longest :] if self._longest > 1 else ""
        self._remember(held.key, masked)
        return held.entry, masked

    def _across(
        self, before: str, after: str
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Spans of ``before``'s end and ``after``'s head holding one secret between them."""
        reach = self._longest - 1
        if reach <= 0:
            return [], []
        left = before[-reach:]
        window = left + after[:reach]
        cut = len(left)
        tail: list[tuple[int, int]] = []
        head: list[tuple[int, int]] = []
        for start, stop in _intervals(window, self._pieces):
            if start < cut < stop:
                offset = len(before) - cut
                tail.append((offset + start, len(before)))
                head.append((0, stop - cut))
        return tail, head

    def _may_begin_secret(self, text: str) -> bool:
        if not text:
            return False
        return any(text.endswith(piece[:k]) for piece, k in self._starts.get(text[-1], ()))

    def _remember(self, key: str, masked: str) -> None:
        self._done[key] = masked
        if len(self._done) > REMEMBERED_ENTRIES:
            self._done.popitem(last=False)


def mask_entries(masker: SecretMasker, entries: Sequence[LogEntry]) -> list[str]:
    """The masked text of each of ``entries`` (all at hand, in order), as a
    :class:`StreamMasker` would mask them: secrets cut across two lines included."""
    streaming = StreamMasker(masker)
    done = streaming.feed(entries, 0.0) + streaming.release(0.0, everything=True)
    by_key = {_entry_key(entry): text for entry, text in done}
    return [by_key.get(_entry_key(e), masker.mask(e.message)) for e in entries]


def _entry_key(entry: LogEntry) -> str:
    if entry.id:
        return "i:" + entry.id
    digest = hashlib.sha256(f"{entry.timestamp}\0{entry.level}\0{entry.message}".encode())
    return "h:" + digest.hexdigest()[:32]


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
