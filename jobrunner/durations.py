"""Human durations: ``"90s"``, ``"10m"``, ``"1h30m"``, ``"250ms"`` or a number of seconds.

Job files, CLI flags and settings all spell time spans this way, so the parser lives in one
place. Units: ``ms``, ``s``, ``m``, ``h``, ``d``. Parts may follow one another (``"1h30m"``,
``"2m 30s"``) and may have a decimal point (``"1.5h"``). A bare number, or a string holding only a
number, means seconds.
"""

from __future__ import annotations

import math
import re

__all__ = ["format_duration", "parse_duration"]

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# "ms" must come before "m" and "s" in the alternation so "250ms" is not read as 250 minutes + "s".
_PART = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)", re.IGNORECASE)
_PLAIN_NUMBER = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*")
_EXAMPLES = "a number of seconds or a string like '90s', '10m', '2h' or '1h30m'"


def parse_duration(value: str | int | float, *, key: str = "") -> float:
    """Return ``value`` in seconds (a non-negative float).

    Raises ``ValueError`` whose message names ``key`` (when given) and shows valid examples, for
    negative numbers, booleans, unknown units and anything else that is not a duration.
    """
    where = f"{key}: " if key else ""
    # bool is an int subclass; `timeout = true` is a mistake, not one second.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}{value!r} is not a duration; use {_EXAMPLES}")
    seconds = float(value) if isinstance(value, (int, float)) else _parse_text(value, where)
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"{where}{value!r} is not a duration; use {_EXAMPLES} (not negative)")
    return seconds


def _parse_text(text: str, where: str) -> float:
    plain = _PLAIN_NUMBER.fullmatch(text)
    if plain is not None:
        return float(plain.group(1))
    total = 0.0
    position = 0
    for match in _PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
        position = match.end()
    if position == 0 or text[position:].strip():
        raise ValueError(f"{where}{text!r} is not a duration; use {_EXAMPLES}")
    return total


def format_duration(seconds: float) -> str:
    """Format seconds compactly: 90 is ``"1m30s"``, 3600 is ``"1h"``, 0.25 is ``"250ms"``.

    The result parses back with :func:`parse_duration` to the same value (to the millisecond).
    """
    if seconds < 0:
        return "-" + format_duration(-seconds)
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    whole, frac_ms = divmod(millis, 1000)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if days:
        parts.append(f"{days}d")
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if frac_ms:
        parts.append(f"{secs}.{frac_ms:03d}".rstrip("0") + "s")
    elif secs:
        parts.append(f"{secs}s")
    return "".join(parts)
