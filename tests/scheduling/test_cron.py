"""jobrunner.cron: parsing, DST rules, window algebra and jitter.

The DST counts are the table in the module docstring. The property tests compare
`CronSchedule` with a brute-force oracle. The oracle walks every UTC second or minute of the
window and asks zoneinfo for its wall time, so it does not share the engine's logic.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter_range
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobrunner.cron import CronError, CronSchedule, GapSkip, Tick, jitter_offset
from jobrunner.errors import JobrunnerError

SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local_day_window(zone: str, day: date) -> tuple[datetime, datetime]:
    """`(after, until]` covering the local calendar day `day`, [00:00, 24:00)."""
    z = ZoneInfo(zone)
    start = datetime.combine(day, time(), z).astimezone(UTC)
    end = datetime.combine(day + DAY, time(), z).astimezone(UTC)
    return start - timedelta(microseconds=1), end - timedelta(microseconds=1)


def day_counts(expression: str, zone: str, day: date) -> tuple[int, int]:
    schedule = CronSchedule.parse(expression, zone)
    after, until = local_day_window(zone, day)
    return len(schedule.ticks(after, until)), len(schedule.skipped_in_gap(after, until))


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "first_two"),
    [
        ("30 2 * * *", [utc(2025, 6, 1, 2, 30), utc(2025, 6, 2, 2, 30)]),
        ("*/10 * * * * *", [utc(2025, 6, 1, 0, 0, 10), utc(2025, 6, 1, 0, 0, 20)]),
        ("30 0 12 * * *", [utc(2025, 6, 1, 12, 0, 30), utc(2025, 6, 2, 12, 0, 30)]),
        ("0 0 9 * * MON-FRI", [utc(2025, 6, 2, 9), utc(2025, 6, 3, 9)]),
        ("@hourly", [utc(2025, 6, 1, 1), utc(2025, 6, 1, 2)]),
        ("@HOURLY", [utc(2025, 6, 1, 1), utc(2025, 6, 1, 2)]),
        ("@daily", [utc(2025, 6, 2), utc(2025, 6, 3)]),
        ("@midnight", [utc(2025, 6, 2), utc(2025, 6, 3)]),
        ("@weekly", [utc(2025, 6, 8), utc(2025, 6, 15)]),
        ("@monthly", [utc(2025, 7, 1), utc(2025, 8, 1)]),
        ("@yearly", [utc(2026, 1, 1), utc(2027, 1, 1)]),
        ("@annually", [utc(2026, 1, 1), utc(2027, 1, 1)]),
        ("0 9 L * *", [utc(2025, 6, 30, 9), utc(2025, 7, 31, 9)]),
        ("0 9 * * 1#1", [utc(2025, 6, 2, 9), utc(2025, 7, 7, 9)]),
        ("0 9 * * 7", [utc(2025, 6, 1, 9), utc(2025, 6, 8, 9)]),
        ("0 9 29 2 *", [utc(2028, 2, 29, 9), utc(2032, 2, 29, 9)]),
        ("  15   3 * * *  ", [utc(2025, 6, 1, 3, 15), utc(2025, 6, 2, 3, 15)]),
    ],
)
def test_accepted_forms_fire_where_expected(expression: str, first_two: list[datetime]) -> None:
    schedule = CronSchedule.parse(expression)
    after = utc(2025, 6, 1)
    assert [t.scheduled_for for t in schedule.next_ticks(after, 2)] == first_two


def test_six_fields_put_the_seconds_first_not_last() -> None:
    # croniter alone would read this as "minute 0 of every hour, at second 0" (seconds last).
    schedule = CronSchedule.parse("0 * * * * 0")
    ticks = schedule.next_ticks(utc(2025, 6, 1, 12), 3)  # 2025-06-01 is a Sunday
    assert [t.scheduled_for for t in ticks] == [utc(2025, 6, 1, 12, m) for m in (1, 2, 3)]
    assert schedule.next_ticks(utc(2025, 6, 1, 23, 59), 1)[0].scheduled_for == utc(2025, 6, 8)


@pytest.mark.parametrize(
    ("expression", "needles"),
    [
        ("", ["empty", "5 fields", "seconds FIRST", "@hourly"]),
        ("   ", ["empty"]),
        ("* * * *", ["4 field", "5 fields", "'*/10 * * * * *'"]),
        ("0 0 * * * * 2030", ["7 fields", "year"]),
        ("61 * * * *", ["minute field '61'", "0-59"]),
        ("* 24 * * *", ["hour field '24'", "0-23"]),
        ("* * 0 * *", ["day-of-month field '0'", "1-31", "'L'"]),
        ("* * * 13 *", ["month field '13'", "JAN-DEC"]),
        ("* * * * 8", ["day-of-week field '8'", "SUN-SAT"]),
        ("* * * * funday", ["day-of-week field 'funday'"]),
        ("60 * * * * *", ["second field '60'", "0-59"]),
        ("*/0 * * * *", ["minute field '*/0'", "step"]),
        ("a b c d e", ["minute field 'a'"]),
        ("* * * * 1#6", ["day-of-week field '1#6'", "n#k"]),
        ("@every 5m", ["'@every' is not supported", "*/5 * * * *"]),
        ("@reboot", ["'@reboot' is not supported"]),
        ("@often", ["unknown macro '@often'", "@yearly", "@hourly"]),
        ("H * * * *", ["hashed 'H'", "minute field"]),
        ("0 H(0-5) * * *", ["hashed 'H'", "hour field"]),
        ("R * * * *", ["random 'R'"]),
        ("0 0 30 2 *", ["never fires", "[30]", "[2]"]),
        ("0 0 31 4,6,9,11 *", ["never fires"]),
        ("0 0 31 2 1#1", ["never fires", "day-of-week '1#1'"]),
    ],
)
def test_invalid_expressions_name_the_problem_and_the_allowed_forms(
    expression: str, needles: list[str]
) -> None:
    with pytest.raises(CronError) as caught:
        CronSchedule.parse(expression)
    message = str(caught.value)
    for needle in needles:
        assert needle in message, message
    assert caught.value.expression == expression


def test_cron_error_is_a_value_error_and_a_jobrunner_error() -> None:
    with pytest.raises(ValueError, match="minute field"):
        CronSchedule.parse("99 * * * *")
    assert issubclass(CronError, JobrunnerError)


def test_a_non_string_expression_is_rejected() -> None:
    with pytest.raises(CronError, match="must be a string"):
        CronSchedule.parse(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("zone", "needles"),
    [
        ("Europe/Berln", ["unknown time zone 'Europe/Berln'", "did you mean 'Europe/Berlin'"]),
        ("europe/berlin", ["did you mean 'Europe/Berlin'"]),
        ("utc", ["did you mean 'UTC'"]),
        ("Mars/Olympus_Mons", ["unknown time zone", "'Europe/Berlin'", "IANA"]),
        ("", ["time zone must be", "'Europe/Berlin'"]),
        ("/etc/localtime", ["unknown time zone"]),
        ("Europe", ["unknown time zone"]),
    ],
)
def test_unknown_time_zones_are_rejected_with_a_suggestion(zone: str, needles: list[str]) -> None:
    with pytest.raises(CronError) as caught:
        CronSchedule.parse("* * * * *", zone)
    for needle in needles:
        assert needle in str(caught.value), str(caught.value)
    assert caught.value.timezone == zone


def test_parse_caches_and_equality_ignores_the_cache() -> None:
    a = CronSchedule.parse("*/5 * * * *", "Europe/Berlin")
    assert CronSchedule.parse("*/5 * * * *", "Europe/Berlin") is a
    b = CronSchedule("*/5 * * * *", "Europe/Berlin")
    assert a == b and hash(a) == hash(b) and a is not b
    assert a != CronSchedule.parse("*/5 * * * *")
    assert repr(a) == "CronSchedule(expression='*/5 * * * *', timezone='Europe/Berlin')"
    assert a.zone == ZoneInfo("Europe/Berlin")


def test_direct_construction_validates_too() -> None:
    with pytest.raises(CronError):
        CronSchedule("61 * * * *")


@pytest.mark.parametrize(
    ("expression", "hourly"),
    [
        ("0 * * * *", True),
        ("@hourly", True),
        ("*/10 * * * * *", True),
        ("0 0-23 * * *", True),
        ("30 2 * * *", False),
        ("*/15 1-3 * * *", False),
        ("@daily", False),
        ("0 */2 * * *", False),
    ],
)
def test_repeats_hourly_is_whether_the_hour_field_matches_every_hour(
    expression: str, hourly: bool
) -> None:
    assert CronSchedule.parse(expression).repeats_hourly is hourly


# --- windows -------------------------------------------------------------------------------


def test_windows_are_open_on_the_left_and_closed_on_the_right() -> None:
    schedule = CronSchedule.parse("0 * * * *")
    assert [t.scheduled_for for t in schedule.ticks(utc(2025, 6, 1, 1), utc(2025, 6, 1, 3))] == [
        utc(2025, 6, 1, 2),
        utc(2025, 6, 1, 3),
    ]
    assert schedule.ticks(utc(2025, 6, 1, 3), utc(2025, 6, 1, 3)) == []
    assert schedule.ticks(utc(2025, 6, 1, 4), utc(2025, 6, 1, 3)) == []


def test_windows_may_be_given_in_any_zone() -> None:
    schedule = CronSchedule.parse("0 * * * *", "Europe/Berlin")
    berlin = ZoneInfo("Europe/Berlin")
    ticks = schedule.ticks(datetime(2025, 6, 1, 3, 30, tzinfo=berlin), utc(2025, 6, 1, 3, 30))
    assert [t.local.hour for t in ticks] == [4, 5]


def test_naive_datetimes_are_rejected() -> None:
    schedule = CronSchedule.parse("* * * * *")
    with pytest.raises(ValueError, match="after must be a timezone-aware"):
        schedule.ticks(datetime(2025, 1, 1), utc(2025, 1, 2))
    with pytest.raises(ValueError, match="until must be a timezone-aware"):
        schedule.skipped_in_gap(utc(2025, 1, 1), datetime(2025, 1, 2))
    with pytest.raises(ValueError, match="after must be a timezone-aware"):
        schedule.next_ticks(datetime(2025, 1, 1), 1)


def test_next_ticks_edge_cases() -> None:
    schedule = CronSchedule.parse("* * * * *")
    assert schedule.next_ticks(utc(2025, 1, 1), 0) == []
    assert schedule.next_ticks(utc(2025, 1, 1), -3) == []
    with pytest.raises(TypeError):
        schedule.next_ticks(utc(2025, 1, 1), 1.5)  # type: ignore[arg-type]
    # A schedule whose only fire is in a gap still yields its other years.
    gap_only = CronSchedule.parse("30 2 30 3 *", "Europe/Berlin")  # 2025-03-30 is the DST day
    assert [t.scheduled_for.year for t in gap_only.next_ticks(utc(2025, 1, 1), 2)] == [2026, 2027]


def test_returned_lists_are_fresh_copies() -> None:
    schedule = CronSchedule.parse("*/5 * * * *")
    after, until = utc(2025, 1, 1), utc(2025, 1, 1, 1)
    first = schedule.ticks(after, until)
    first.clear()
    assert len(schedule.ticks(after, until)) == 12


def test_sliding_one_second_windows_equal_one_big_window() -> None:
    """The scheduler's steady state, across a spring-forward and a fall-back transition."""
    for zone, jump in [
        ("Europe/Berlin", utc(2025, 3, 30, 1)),
        ("Australia/Sydney", utc(2025, 4, 5, 16)),
    ]:
        schedule = CronSchedule.parse("*/10 * * * * *", zone)
        start, end = jump - 10 * MINUTE, jump + 10 * MINUTE
        ticks: list[Tick] = []
        gaps: list[GapSkip] = []
        at = start
        while at < end:
            ticks += schedule.ticks(at, at + SECOND)
            gaps += schedule.skipped_in_gap(at, at + SECOND)
            at += SECOND
        assert ticks == CronSchedule(schedule.expression, zone).ticks(start, end)
        assert gaps == CronSchedule(schedule.expression, zone).skipped_in_gap(start, end)
        assert len(ticks) == 120
        assert len(gaps) == (360 if zone == "Europe/Berlin" else 0)


# --- DST: counts per local day (the table in the module docstring) ----------------------------

# (zone, normal day, spring-forward day, fall-back day, the hour that repeats on fall-back day)
ZONES = [
    ("Europe/Berlin", date(2025, 6, 1), date(2025, 3, 30), date(2025, 10, 26), 2),
    ("Australia/Sydney", date(2025, 1, 15), date(2025, 10, 5), date(2025, 4, 6), 2),
    ("America/New_York", date(2025, 6, 1), date(2025, 3, 9), date(2025, 11, 2), 1),
]
# expression -> ((fires, gap skips) on the normal, spring-forward and fall-back day)
COUNTS = {
    "30 2 * * *": ((1, 0), (0, 1), (1, 0)),
    "0 * * * *": ((24, 0), (23, 1), (25, 0)),
    "@hourly": ((24, 0), (23, 1), (25, 0)),
    "*/15 * * * *": ((96, 0), (92, 4), (100, 0)),
    "*/15 1-3 * * *": ((12, 0), (8, 4), (12, 0)),
    "*/10 * * * * *": ((8640, 0), (8280, 360), (9000, 0)),
    "@daily": ((1, 0), (1, 0), (1, 0)),
}


@pytest.mark.parametrize("zone", [z[0] for z in ZONES])
@pytest.mark.parametrize("expression", list(COUNTS))
def test_fires_per_local_day(zone: str, expression: str) -> None:
    _, normal, spring, fall, _ = next(z for z in ZONES if z[0] == zone)
    got = tuple(day_counts(expression, zone, d) for d in (normal, spring, fall))
    assert got == COUNTS[expression]


@pytest.mark.parametrize(("zone", "fall", "hour"), [(z[0], z[3], z[4]) for z in ZONES])
def test_a_fixed_time_in_the_repeated_hour_fires_once_at_the_first_pass(
    zone: str, fall: date, hour: int
) -> None:
    schedule = CronSchedule.parse(f"30 {hour} * * *", zone)
    (tick,) = schedule.ticks(*local_day_window(zone, fall))
    z = ZoneInfo(zone)
    first_pass = datetime.combine(fall, time(hour, 30), z)  # fold=0
    assert tick.scheduled_for == first_pass.astimezone(UTC)
    assert tick.local.fold == 0 and tick.local.replace(tzinfo=None) == first_pass.replace(
        tzinfo=None
    )
    second_pass = first_pass.replace(fold=1).astimezone(UTC)
    assert second_pass - tick.scheduled_for == HOUR  # and that one is not fired


@pytest.mark.parametrize(("zone", "spring", "fall"), [(z[0], z[2], z[3]) for z in ZONES])
def test_hourly_fires_once_per_real_hour_through_both_transitions(
    zone: str, spring: date, fall: date
) -> None:
    schedule = CronSchedule.parse("@hourly", zone)
    for day in (spring, fall):
        after, until = local_day_window(zone, day)
        ticks = schedule.ticks(after - DAY, until + DAY)
        steps = [b.scheduled_for - a.scheduled_for for a, b in itertools.pairwise(ticks)]
        assert set(steps) == {HOUR}
        assert len(ticks) == {spring: 23, fall: 25}[day] + 48
        for tick in ticks:
            assert tick.local == tick.scheduled_for.astimezone(ZoneInfo(zone))
            assert tick.local.fold == tick.scheduled_for.astimezone(ZoneInfo(zone)).fold
    folds = [t.local.fold for t in schedule.ticks(*local_day_window(zone, fall))]
    assert folds.count(1) == 1


@pytest.mark.parametrize(("zone", "spring"), [(z[0], z[2]) for z in ZONES])
def test_a_time_in_the_gap_is_skipped_and_reported_exactly_once(zone: str, spring: date) -> None:
    schedule = CronSchedule.parse("30 2 * * *", zone)
    after, until = local_day_window(zone, spring)
    assert schedule.ticks(after, until) == []
    # Report it from one-minute windows over two days: exactly one window sees it.
    seen: list[GapSkip] = []
    at = after - DAY
    while at < until + DAY:
        seen += schedule.skipped_in_gap(at, at + MINUTE)
        at += MINUTE
    assert len(seen) == 1
    (skip,) = seen
    assert skip.wall_time == datetime.combine(spring, time(2, 30))
    jump = datetime.combine(spring, time(3), ZoneInfo(zone)).astimezone(UTC)  # 03:00 exists
    assert jump - SECOND < skip.near < jump
    assert skip.near.microsecond != 0  # never a fire instant
    # It is not moved to 03:00: the next fire is the next day's 02:30.
    (nxt,) = schedule.next_ticks(skip.near, 1)
    assert nxt.local.replace(tzinfo=None) == datetime.combine(spring + DAY, time(2, 30))


def test_gap_skips_have_distinct_instants_that_are_never_fire_instants() -> None:
    # In Berlin the jump is at 01:00 UTC, which is also the instant of the 03:00 CEST fire.
    for expression in ("0 * * * *", "*/15 * * * *", "*/10 * * * * *", "* * * * *"):
        schedule = CronSchedule.parse(expression, "Europe/Berlin")
        after, until = utc(2025, 3, 29, 12), utc(2025, 3, 30, 12)
        ticks = {t.scheduled_for for t in schedule.ticks(after, until)}
        skips = schedule.skipped_in_gap(after, until)
        nears = [s.near for s in skips]
        assert len(set(nears)) == len(nears) > 0
        assert not ticks & set(nears)
        assert nears == sorted(nears)
        assert [s.wall_time for s in skips] == sorted(s.wall_time for s in skips)
    assert utc(2025, 3, 30, 1) in {
        t.scheduled_for for t in CronSchedule.parse("@hourly", "Europe/Berlin").ticks(after, until)
    }


def test_midnight_can_be_in_the_gap() -> None:
    # Sao Paulo moved its clocks from 00:00 to 01:00 on 2018-11-04: that day had no midnight.
    schedule = CronSchedule.parse("@daily", "America/Sao_Paulo")
    after, until = utc(2018, 11, 3, 12), utc(2018, 11, 5, 12)
    assert [t.local.date() for t in schedule.ticks(after, until)] == [date(2018, 11, 5)]
    (skip,) = schedule.skipped_in_gap(after, until)
    assert skip.wall_time == datetime(2018, 11, 4)


def test_half_hour_dst_lord_howe() -> None:
    # Lord Howe Island moves its clocks by 30 minutes: 02:00 -> 02:30 and 02:00 -> 01:30.
    schedule = CronSchedule.parse("0,30 * * * *", "Australia/Lord_Howe")
    assert day_counts("0,30 * * * *", "Australia/Lord_Howe", date(2025, 10, 5)) == (47, 1)
    assert day_counts("0,30 * * * *", "Australia/Lord_Howe", date(2025, 4, 6)) == (49, 0)
    ticks = schedule.ticks(*local_day_window("Australia/Lord_Howe", date(2025, 4, 6)))
    steps = {b.scheduled_for - a.scheduled_for for a, b in itertools.pairwise(ticks)}
    assert steps == {timedelta(minutes=30)}


def test_non_dst_zones_have_no_surprises() -> None:
    for zone in ("UTC", "Asia/Kolkata", "Asia/Kathmandu"):
        assert day_counts("*/15 * * * *", zone, date(2025, 3, 30)) == (96, 0)


# --- jitter --------------------------------------------------------------------------------


def test_jitter_is_deterministic_bounded_and_spread() -> None:
    tick = utc(2025, 6, 1, 12)
    assert jitter_offset("nightly", tick, 30.0) == jitter_offset("nightly", tick, 30.0)
    berlin = tick.astimezone(ZoneInfo("Europe/Berlin"))
    assert jitter_offset("nightly", berlin, 30.0) == jitter_offset("nightly", tick, 30.0)
    values = [jitter_offset("nightly", tick + i * MINUTE, 30.0) for i in range(2000)]
    assert all(0.0 <= v < 30.0 for v in values)
    assert len(set(values)) == len(values)
    assert 13.0 < sum(values) / len(values) < 17.0
    assert jitter_offset("other", tick, 30.0) != jitter_offset("nightly", tick, 30.0)
    assert jitter_offset("nightly", tick, 0) == 0.0
    assert jitter_offset("x", tick, 1e-300) < 1e-300


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_jitter_rejects_bad_windows(bad: float) -> None:
    with pytest.raises(ValueError, match="jitter_s"):
        jitter_offset("k", utc(2025, 1, 1), bad)


def test_jitter_rejects_naive_ticks() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        jitter_offset("k", datetime(2025, 1, 1), 1.0)


# --- properties against a brute-force oracle ---------------------------------------------------

PROPERTY_ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "Europe/Dublin",
    "America/Sao_Paulo",
    "Pacific/Chatham",
    "Asia/Kolkata",
]

# (text, values) per field; None means "*" in the day fields. -1 stands for "L".
SECONDS = [("0", {0}), ("*/10", set(range(0, 60, 10))), ("15,45", {15, 45}), ("*/20", {0, 20, 40})]
MINUTES = [
    ("*", set(range(60))),
    ("0", {0}),
    ("30", {30}),
    ("*/15", {0, 15, 30, 45}),
    ("0,30", {0, 30}),
    ("5-10", set(range(5, 11))),
    ("*/7", set(range(0, 60, 7))),
    ("58-2", {58, 59, 0, 1, 2}),
    ("45", {45}),
]
HOURS = [
    ("*", set(range(24))),
    ("*/1", set(range(24))),
    ("2", {2}),
    ("1", {1}),
    ("0", {0}),
    ("1-3", {1, 2, 3}),
    ("*/2", set(range(0, 24, 2))),
    ("0,2,3", {0, 2, 3}),
    ("22-2", {22, 23, 0, 1, 2}),
]
DOMS: list[tuple[str, set[int] | None]] = [
    ("*", None),
    ("*", None),
    ("1", {1}),
    ("L", {-1}),
    ("1-7", set(range(1, 8))),
    ("15,30", {15, 30}),
]
MONTHS: list[tuple[str, set[int] | None]] = [
    ("*", None),
    ("*", None),
    ("3,4,10,11", {3, 4, 10, 11}),
    ("MAR", {3}),
    ("OCT-NOV", {10, 11}),
]
DOWS: list[tuple[str, set[int] | None]] = [
    ("*", None),
    ("*", None),
    ("0", {0}),
    ("SUN", {0}),
    ("1-5", {1, 2, 3, 4, 5}),
    ("SAT,SUN", {6, 0}),
    ("7", {0}),
]


@dataclass(frozen=True)
class Spec:
    text: str
    seconds: frozenset[int] | None  # None: a 5-field expression (second 0)
    minutes: frozenset[int]
    hours: frozenset[int]
    doms: frozenset[int] | None
    months: frozenset[int] | None
    dows: frozenset[int] | None

    @property
    def step(self) -> timedelta:
        return MINUTE if self.seconds is None else SECOND

    def matches(self, wall: datetime) -> bool:
        if wall.second not in (self.seconds or {0}) or wall.minute not in self.minutes:
            return False
        if wall.hour not in self.hours or (self.months and wall.month not in self.months):
            return False
        last = ((wall.replace(day=28) + timedelta(days=4)).replace(day=1) - DAY).day
        dom_ok = self.doms is not None and (
            wall.day in self.doms or (-1 in self.doms and wall.day == last)
        )
        dow_ok = self.dows is not None and wall.isoweekday() % 7 in self.dows
        if self.doms is None and self.dows is None:
            return True
        return dom_ok or dow_ok  # one restricted: that one; both: either (Vixie cron)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    seconds = draw(st.none() | st.sampled_from(SECONDS))
    minute, hour, dom, month, dow = (
        draw(st.sampled_from(choices)) for choices in (MINUTES, HOURS, DOMS, MONTHS, DOWS)
    )
    parts = (
        [minute, hour, dom, month, dow]
        if seconds is None
        else [seconds, minute, hour, dom, month, dow]
    )
    text = " ".join(p[0] for p in parts)

    def frozen(values: set[int] | None) -> frozenset[int] | None:
        return None if values is None else frozenset(values)

    return Spec(
        text,
        None if seconds is None else frozenset(seconds[1]),
        frozenset(minute[1]),
        frozenset(hour[1]),
        frozen(dom[1]),
        frozen(month[1]),
        frozen(dow[1]),
    )


@functools.cache
def transitions(zone: str) -> list[datetime]:
    """Every UTC instant in 2017-2027 at which `zone` changes its UTC offset."""
    z = ZoneInfo(zone)
    found = []
    at = utc(2017, 1, 1)
    offset = at.astimezone(z).utcoffset()
    while at < utc(2027, 12, 31):
        nxt = at + 6 * HOUR
        if nxt.astimezone(z).utcoffset() != offset:
            lo, hi = at, nxt
            while hi - lo > SECOND:
                mid = lo + (hi - lo) / 2
                mid -= timedelta(microseconds=mid.microsecond)
                lo, hi = (mid, hi) if mid.astimezone(z).utcoffset() == offset else (lo, mid)
            found.append(hi)
            offset = nxt.astimezone(z).utcoffset()
        at = nxt
    return found


@st.composite
def windows(draw: st.DrawFn, zone: str, spec: Spec) -> tuple[datetime, datetime]:
    """A window of up to 3 days (2 hours for seconds), often with an end near a DST change."""
    longest = 3 * 86400 if spec.seconds is None else 2 * 3600
    length = draw(st.integers(1, longest)) * SECOND
    near = transitions(zone)
    mode = draw(st.sampled_from(["anywhere", "covers", "starts near", "ends near"]))
    if not near or mode == "anywhere":
        after = utc(2017, 1, 1) + draw(st.integers(0, 10 * 365 * 86400)) * SECOND
    else:
        jump = draw(st.sampled_from(near))
        if mode == "covers":
            after = jump - draw(st.integers(0, int(length / SECOND))) * SECOND
        else:
            after = jump + draw(st.integers(-3 * 3600, 3 * 3600)) * SECOND
            after -= length if mode == "ends near" else timedelta()
    after += draw(st.sampled_from([0, 0, 1, 999_999])) * timedelta(microseconds=1)
    return after, after + length


def oracle(
    spec: Spec, zone: str, after: datetime, until: datetime
) -> tuple[list[datetime], list[tuple[datetime, datetime]]]:
    """Fires and (near, wall) gap skips in (after, until], by walking every UTC step."""
    z = ZoneInfo(zone)
    step = spec.step
    interval = spec.hours == frozenset(range(24))
    at = after.replace(second=0, microsecond=0) - step  # aligned, and before `after`
    previous = at.astimezone(z).replace(tzinfo=None)
    fires: list[datetime] = []
    skips: list[tuple[datetime, datetime]] = []
    while at <= until + step:
        at += step
        local = at.astimezone(z)
        wall = local.replace(tzinfo=None, fold=0)
        if wall - previous > step:  # the clocks jumped at `at`: walls in between do not exist
            missing = previous + step
            while missing < wall:
                near = at - timedelta(microseconds=(wall - missing) // SECOND)
                if spec.matches(missing) and after < near <= until:
                    skips.append((near, missing))
                missing += step
        previous = wall
        if not (after < at <= until) or not spec.matches(wall):
            continue
        repeated = z.utcoffset(wall) != z.utcoffset(wall.replace(fold=1))
        if local.fold == 1 and repeated and not interval:
            continue  # the second pass of a fixed-hour time
        fires.append(at)
    return fires, skips


@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_ticks_and_gap_skips_match_the_oracle(data: st.DataObject) -> None:
    spec = data.draw(specs(), label="spec")
    zone = data.draw(st.sampled_from(PROPERTY_ZONES), label="zone")
    after, until = data.draw(windows(zone, spec), label="window")
    schedule = CronSchedule.parse(spec.text, zone)
    ticks = schedule.ticks(after, until)
    skips = schedule.skipped_in_gap(after, until)
    want_fires, want_skips = oracle(spec, zone, after, until)

    instants = [t.scheduled_for for t in ticks]
    assert instants == want_fires
    assert all(a < b for a, b in itertools.pairwise(instants))
    z = ZoneInfo(zone)
    for tick in ticks:
        assert tick.scheduled_for.tzinfo is UTC
        assert tick.local == tick.scheduled_for.astimezone(z)
        assert tick.local.fold == tick.scheduled_for.astimezone(z).fold
        wall = tick.local.replace(tzinfo=None)
        assert spec.matches(wall)
        assert wall.replace(tzinfo=z).astimezone(UTC).astimezone(z).replace(tzinfo=None) == wall
    assert [(s.near, s.wall_time) for s in skips] == want_skips
    assert not {s.near for s in skips} & set(instants)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_adjacent_windows_add_up_to_the_whole_window(data: st.DataObject) -> None:
    """Catch-up is exact: splitting a window anywhere loses and doubles no tick or skip."""
    spec = data.draw(specs(), label="spec")
    zone = data.draw(st.sampled_from(PROPERTY_ZONES), label="zone")
    after, until = data.draw(windows(zone, spec), label="window")
    span = int((until - after) / timedelta(microseconds=1))
    cuts = sorted(data.draw(st.lists(st.integers(0, span), max_size=4), label="cuts"))
    bounds = [after, *(after + timedelta(microseconds=c) for c in cuts), until]
    fresh = CronSchedule(spec.text, zone)  # its own memo, so the split calls start cold
    whole_ticks = CronSchedule(spec.text, zone).ticks(after, until)
    whole_skips = CronSchedule(spec.text, zone).skipped_in_gap(after, until)
    parts_ticks: list[Tick] = []
    parts_skips: list[GapSkip] = []
    for a, b in itertools.pairwise(bounds):
        parts_ticks += fresh.ticks(a, b)
        parts_skips += fresh.skipped_in_gap(a, b)
    assert parts_ticks == whole_ticks
    assert parts_skips == whole_skips
    n = data.draw(st.integers(1, 5), label="n")
    if len(whole_ticks) >= n:
        assert fresh.next_ticks(after, n) == whole_ticks[:n]


DAY_FIELDS = [
    "L * *",
    "15W * *",
    "* * 1#1",
    "* * L5",
    "1,15 * *",
    "13 * 5",
    "* 2 MON-FRI",
    "L 2,8 *",
    "29 2 *",
    "1W * *",
    "31 * *",
    "? * 6#5",
]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    days=st.sampled_from(DAY_FIELDS),
    time_fields=st.sampled_from(["0 9", "30 0", "59 23", "*/30 12"]),
    start=st.integers(0, 9 * 365),
    length=st.integers(1, 400),
)
def test_day_fields_agree_with_croniter_in_utc(
    days: str, time_fields: str, start: int, length: int
) -> None:
    """For the day syntax (L, W, #), the engine defers to croniter: check they agree."""
    expression = f"{time_fields} {days}"
    after = utc(2018, 1, 1) + start * DAY
    until = after + length * DAY
    ours = [t.scheduled_for for t in CronSchedule.parse(expression).ticks(after, until)]
    theirs = [
        d.replace(tzinfo=UTC)
        for d in croniter_range(
            after.replace(tzinfo=None), until.replace(tzinfo=None), expression, ret_type=datetime
        )
        if after < d.replace(tzinfo=UTC) <= until
    ]
    assert ours == theirs


SPEC_EVERY_15 = Spec("*/15 * * * *", None, frozenset({0, 15, 30, 45}), frozenset(range(24)),
                     None, None, None)  # fmt: skip
SPEC_NIGHT_15 = Spec("*/15 1-3 * * *", None, frozenset({0, 15, 30, 45}), frozenset({1, 2, 3}),
                     None, None, None)  # fmt: skip


@pytest.mark.parametrize("spec", [SPEC_EVERY_15, SPEC_NIGHT_15], ids=lambda s: s.text)
@pytest.mark.parametrize(
    ("zone", "jump"),
    [
        ("Europe/Berlin", utc(2025, 10, 26, 1)),  # fall back 03:00 CEST -> 02:00 CET
        ("Europe/Berlin", utc(2025, 3, 30, 1)),  # spring forward 02:00 CET -> 03:00 CEST
        ("Australia/Sydney", utc(2025, 4, 5, 16)),  # fall back 03:00 AEDT -> 02:00 AEST
        ("America/New_York", utc(2025, 11, 2, 6)),  # fall back 02:00 EDT -> 01:00 EST
    ],
)
def test_every_window_around_a_transition_matches_the_oracle(
    spec: Spec, zone: str, jump: datetime
) -> None:
    """Windows that start or end inside a repeated hour or right at a jump, on a 10-minute grid."""
    grid = [jump + k * 10 * MINUTE + SECOND * (k % 2) for k in range(-13, 14)]
    for i, after in enumerate(grid):
        for until in grid[i + 1 :]:
            schedule = CronSchedule(spec.text, zone)  # cold: no memo from earlier windows
            fires, skips = oracle(spec, zone, after, until)
            assert [t.scheduled_for for t in schedule.ticks(after, until)] == fires
            assert [(s.near, s.wall_time) for s in schedule.skipped_in_gap(after, until)] == skips
