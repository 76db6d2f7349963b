"""Run ids: 26-character, time-sortable, ULID-like strings (Crockford base32).

The first 10 characters are the creation time in milliseconds, the last 16 are random. Ids made by
one generator are strictly increasing, even within one millisecond: the random part then grows by a
random step of at least 2**70 rather than by 1, so the two characters right after the timestamp
change too and the 12-character short ids stay distinct.
"""

from __future__ import annotations

import secrets
import threading
import time

__all__ = [
    "ALPHABET",
    "ID_LENGTH",
    "SHORT_ID_LENGTH",
    "RunIdGenerator",
    "decode_time_ms",
    "new_run_id",
    "normalise_prefix",
]

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_LENGTH = 26
# What the CLI shows: the timestamp plus two random characters.
SHORT_ID_LENGTH = 12
_TIME_CHARS = 10
_RANDOM_CHARS = 16
_RANDOM_LIMIT = 1 << 80
# Steps within one millisecond: at least one unit of the 12th character (2**70), at most three.
_MIN_STEP = 1 << 70
_STEP_SPREAD = 1 << 71


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))


def decode_time_ms(run_id: str) -> int:
    """The creation time (Unix milliseconds) encoded in an id."""
    value = 0
    for char in run_id[:_TIME_CHARS]:
        value = value * 32 + ALPHABET.index(char)
    return value


class RunIdGenerator:
    """Makes increasing ids; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._last_random = 0

    def __call__(self, now_ms: int | None = None) -> str:
        millis = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            if millis <= self._last_ms:
                millis = self._last_ms
                random_part = self._last_random + _MIN_STEP + secrets.randbelow(_STEP_SPREAD)
                if random_part >= _RANDOM_LIMIT:
                    millis, random_part = millis + 1, secrets.randbelow(_RANDOM_LIMIT >> 1)
            else:
                # Start in the lower half, leaving room for steps within the same millisecond.
                random_part = secrets.randbelow(_RANDOM_LIMIT >> 1)
            self._last_ms, self._last_random = millis, random_part
        return _encode(millis, _TIME_CHARS) + _encode(random_part, _RANDOM_CHARS)


_default = RunIdGenerator()


def new_run_id() -> str:
    """A new id, greater than every id this process made before."""
    return _default()


def normalise_prefix(text: str) -> str | None:
    """The upper-case form of a typed id or prefix, or None if it has characters ids never have."""
    upper = text.strip().upper()
    if not upper or any(c not in ALPHABET for c in upper):
        return None
    return upper
