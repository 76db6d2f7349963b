"""Identifier formats of the Fly Machines API (fly-machines-api.md section 12).

Machine ids are 14 lowercase hex characters, instance and event ids are ULIDs (26 characters of
Crockford base32, ordered by creation time), names look like ``adjective-noun-1234`` and private
addresses are IPv6 in Fly's ``fdaa:`` 6PN range. Clients treat all of them as opaque strings, but
tools (and people reading logs) recognise the shapes, so the local backend copies them.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

__all__ = [
    "is_machine_id",
    "lease_nonce",
    "machine_id",
    "machine_name",
    "private_ip",
    "request_id",
    "ulid",
]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

_ADJECTIVES = (
    "aged", "ancient", "autumn", "billowing", "bitter", "black", "blue", "bold", "broad",
    "broken", "calm", "cold", "cool", "crimson", "curly", "damp", "dark", "dawn", "delicate",
    "divine", "dry", "empty", "falling", "fancy", "flat", "floral", "fragrant", "frosty",
    "gentle", "green", "hidden", "holy", "icy", "jolly", "late", "lingering", "little",
    "lively", "long", "lucky", "misty", "morning", "muddy", "nameless", "noisy", "odd", "old",
    "orange", "patient", "plain", "polished", "proud", "purple", "quiet", "rapid", "raspy",
    "red", "restless", "rough", "round", "royal", "shiny", "shy", "silent", "small", "snowy",
    "soft", "solitary", "sparkling", "spring", "square", "steep", "still", "summer", "super",
    "sweet", "throbbing", "tight", "tiny", "twilight", "wandering", "weathered", "white",
    "wild", "winter", "wispy", "withered", "yellow", "young",
)  # fmt: skip

_NOUNS = (
    "art", "band", "bar", "base", "bird", "block", "boat", "bonus", "bread", "breeze", "brook",
    "bush", "butterfly", "cake", "cell", "cherry", "cloud", "credit", "darkness", "dawn",
    "dew", "disk", "dream", "dust", "feather", "field", "fire", "firefly", "flower", "fog",
    "forest", "frog", "frost", "glade", "glitter", "grass", "hall", "hat", "haze", "heart",
    "hill", "king", "lab", "lake", "leaf", "limit", "math", "meadow", "mode", "moon",
    "morning", "mountain", "mouse", "mud", "night", "paper", "pine", "poetry", "pond",
    "queen", "rain", "recipe", "resonance", "rice", "river", "salad", "scene", "sea",
    "shadow", "shape", "silence", "sky", "smoke", "snow", "snowflake", "sound", "star",
    "sun", "sunset", "surf", "term", "thunder", "tooth", "tree", "truth", "union", "unit",
    "violet", "voice", "water", "waterfall", "wave", "wildflower", "wind", "wood",
)  # fmt: skip


def machine_id() -> str:
    """A new machine id: 14 lowercase hex characters, like ``1857156b526dd8``."""
    return secrets.token_hex(7)


def is_machine_id(value: str) -> bool:
    """Whether ``value`` has the shape of a machine id (used to tell ids from names)."""
    return len(value) == 14 and all(c in "0123456789abcdef" for c in value)


def machine_name() -> str:
    """A generated machine name such as ``aged-thunder-7371``."""
    adjective = secrets.choice(_ADJECTIVES)
    noun = secrets.choice(_NOUNS)
    return f"{adjective}-{noun}-{secrets.randbelow(9000) + 1000}"


def lease_nonce() -> str:
    """A lease nonce: 12 hex characters, like Fly's ``5c35f65c9f95``."""
    return secrets.token_hex(6)


def request_id() -> str:
    """A value for the ``fly-request-id`` response header."""
    return secrets.token_hex(13)


def private_ip(app: str, machine: str) -> str:
    """A stable 6PN-style address: one network prefix per app, the machine id in the host part."""
    app_group = int(hashlib.sha256(app.encode()).hexdigest()[:4], 16)
    host = [int(machine[i : i + 4], 16) for i in (0, 4, 8)]
    return f"fdaa:0:{app_group:x}:a7b:{host[0]:x}:{host[1]:x}:{host[2]:x}:2"


class _UlidFactory:
    """Makes ULIDs that sort in creation order, even for several made in the same millisecond.

    A ULID is 48 bits of Unix milliseconds followed by 80 random bits. Within one millisecond the
    random part is incremented instead of redrawn (the "monotonic" variant of the ULID spec), so
    ordering by string equals ordering by creation in this process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def new(self) -> str:
        with self._lock:
            now_ms = time.time_ns() // 1_000_000
            if now_ms <= self._last_ms:
                now_ms = self._last_ms
                self._last_random = (self._last_random + 1) & ((1 << 80) - 1)
                if self._last_random == 0:  # wrapped: borrow the next millisecond
                    now_ms += 1
            else:
                self._last_random = secrets.randbits(80)
            self._last_ms = now_ms
            value = (now_ms << 80) | self._last_random
        return _encode_base32(value, 26)


def _encode_base32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


_ULIDS = _UlidFactory()


def ulid() -> str:
    """A new 26-character, time-ordered ULID (used for instance ids and event ids)."""
    return _ULIDS.new()
