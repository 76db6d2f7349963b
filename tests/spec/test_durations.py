"""Durations as job files and flags spell them."""

from __future__ import annotations

import pytest

from jobrunner.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1h 30m 15s", 5415.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("1d", 86400.0),
        ("45", 45.0),
        (" 2M ", 120.0),
        (30, 30.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "bad", ["", "ten minutes", "10 parsecs", "1h30", "m", "-5s", -1, True, "1e3s"]
)
def test_parse_duration_rejects_with_the_key_and_examples(bad: object) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(bad, key="timeout")  # type: ignore[arg-type]
    assert str(caught.value).startswith("timeout: ")
    assert "'90s'" in str(caught.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (1.5, "1.5s"),
        (90, "1m30s"),
        (3600, "1h"),
        (5400, "1h30m"),
        (90061, "1d1h1m1s"),
    ],
)
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)
