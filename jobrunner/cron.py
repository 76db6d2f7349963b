"""Cron schedules: which instants a cron expression fires at, in a named time zone.

This module is pure. It does no I/O beyond loading the time-zone database and never reads the
clock. Every function takes the instants it needs, so the scheduler can call it with `at=now`
and tests can call it with any instant.

## Expressions

- **5 fields**: `minute hour day-of-month month day-of-week`, e.g. `"30 2 * * *"`.
- **6 fields, seconds first**: `second minute hour day-of-month month day-of-week`, e.g.
  `"*/10 * * * * *"` fires every 10 seconds. This is the Quartz/Spring/node-cron order.
  croniter's own 6-field form puts seconds *last*. A 6-field expression here is never read
  that way: `"0 * * * * 0"` means "second 0 of every minute on Sundays", not "hourly".
- **Macros**: `@yearly`/`@annually` (`0 0 1 1 *`), `@monthly` (`0 0 1 * *`), `@weekly`
  (`0 0 * * 0`), `@daily`/`@midnight` (`0 0 * * *`), `@hourly` (`0 * * * *`).
  `@every`, `@reboot` and 7-field (year) expressions are rejected.
- croniter parses the fields: `*`, lists `a,b`, ranges `a-b` (a range may wrap, like `22-2`),
  steps `*/n` and `a-b/n`, names `JAN`-`DEC` and `SUN`-`SAT`, `L`, `nW` and `?` in
  day-of-month, and `n#k` and `Ln` in day-of-week. When both day fields are restricted, a day
  matches if either field matches (Vixie cron). Hashed `H` and random `R` values are rejected,
  because each scheduler process would pick its own time.

## Time zones and DST

An expression names **wall-clock times in the schedule's zone**. Each wall-clock time that
matches is decided once:

1. **It exists once**: it fires at that instant.
2. **It does not exist** (the spring-forward gap, e.g. 02:30 on the last Sunday of March in
   Europe/Berlin, or the first Sunday of October in Australia/Sydney): it is **not fired** and
   **not moved** to 03:00. :meth:`CronSchedule.skipped_in_gap` reports it once, as a
   :class:`GapSkip`. The scheduler records it as a skipped fire with reason `"dst_gap"`, so
   every fire decision leaves a row. This applies to every expression, including `@hourly` and
   `*/10 * * * * *`. `GapSkip.near` lies a few microseconds before the jump: at most one
   microsecond per second of the gap. It is unique per skip and never a whole second, while a
   fire is always a whole second. So a store that is unique on (schedule, instant) keeps every
   skip and every fire. The jump instant itself would not work: it is the instant of the 03:00
   fire of `@hourly`.
3. **It occurs twice** (the fall-back overlap, e.g. 02:30 on the last Sunday of October in
   Berlin or the first Sunday of April in Sydney):
   - When the **hour field names specific hours** (`30 2 * * *`, `*/15 1-3 * * *`,
     `@daily`), it fires **once, at the first occurrence** (`fold=0`, still on summer time).
     A daily job never runs twice.
   - When the **hour field matches all 24 hours** (`0 * * * *`, `@hourly`, `*/15 * * * *`,
     `*/10 * * * * *`), it is an interval schedule. It fires **at both occurrences**, so it
     does not go quiet for an hour. Like Vixie cron's wildcard jobs, it fires once per real
     hour. (The other choice, once per wall time, would leave `@hourly` with 24 fires on a
     25-hour day and one real hour without a run.)

Fires per local day in Europe/Berlin in 2025 (23-hour day 30 March, 25-hour day 26 October;
Australia/Sydney is the same on 5 October and 6 April):

| expression          | normal day | spring forward         | fall back        |
|---------------------|-----------:|-----------------------:|-----------------:|
| `30 2 * * *`        |          1 | 0 (+1 gap skip)        | 1 (first 02:30)  |
| `0 * * * *`         |         24 | 23 (+1 gap skip 02:00) | 25               |
| `*/15 * * * *`      |         96 | 92 (+4 gap skips)      | 100              |
| `*/15 1-3 * * *`    |         12 | 8 (+4 gap skips)       | 12               |
| `*/10 * * * * *`    |       8640 | 8280 (+360 gap skips)  | 9000             |

`Tick.scheduled_for` (UTC) is unique per schedule and strictly increasing. Adjacent windows
`(a, b]` and `(b, c]` give exactly the ticks and gap skips of `(a, c]`, so catching up over
downtime in one call or in many loses and doubles nothing.

## Cost

Each schedule remembers where the last window it scanned ended and the next fire or skip after
that. A window that ends before that next event returns `[]` after two comparisons, about 1-3 µs.
The scheduler's steady state, a one-second window every second, almost always takes that path.
Any other call walks the matching wall times from `after`. It costs about 10 µs, plus about
3 µs per tick returned. When the day fields are restricted (e.g. `1-5`, `L`), croniter finds the
next matching day once per day reached, at about 0.3 ms. `CronSchedule.parse` caches instances,
so every caller of one (expression, zone) shares the memo.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import heapq
import math
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import NoReturn
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from croniter import CroniterBadDateError, CroniterError, croniter

from jobrunner.errors import JobrunnerError

__all__ = ["CronError", "CronSchedule", "GapSkip", "Tick", "jitter_offset"]

MACROS: dict[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_FORMS = (
    "use 5 fields 'minute hour day-of-month month day-of-week' (e.g. '30 2 * * *'), "
    "6 fields with the seconds FIRST 'second minute hour day-of-month month day-of-week' "
    "(e.g. '*/10 * * * * *' = every 10 seconds), or one of " + ", ".join(MACROS)
)
_SYNTAX = "'*', a number, a list 'a,b', a range 'a-b' or a step '*/n' / 'a-b/n'"
_ALLOWED = {
    "second": "0-59",
    "minute": "0-59",
    "hour": "0-23",
    "day-of-month": "1-31, 'L' (last day), 'nW' (weekday nearest day n) or '?'",
    "month": "1-12 or JAN-DEC",
    "day-of-week": "0-7 or SUN-SAT (0 and 7 are Sunday), 'n#k' (k-th weekday n of the month), "
    "'Ln' (last weekday n of the month) or '?'",
}
_NAMES_5 = ("minute", "hour", "day-of-month", "month", "day-of-week")
_NAMES_6 = ("second", *_NAMES_5)
# A field whose other positions are these values is valid, so a failure names its own field.
_NEUTRAL_5 = ("0", "0", "*", "*", "*")
_NEUTRAL_6 = ("0", *_NEUTRAL_5)
_TOKENS = re.compile(r"\S+", re.ASCII)  # croniter splits fields the same way
_ZONE_EXAMPLES = (
    "an IANA name such as 'UTC', 'Europe/Berlin', 'America/New_York' or 'Australia/Sydney'"
)
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February as in a leap year
_ONE_DAY = timedelta(days=1)
_MINUTE = timedelta(minutes=1)
_SECOND = timedelta(seconds=1)
_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)
_GAP = 2  # event code; 0 and 1 are fires at fold 0 and fold 1


class CronError(JobrunnerError, ValueError):
    """A cron expression or time zone that cannot be used.

    The message names the bad part and the allowed forms. `.expression` and `.timezone` hold
    the inputs.
    """

    def __init__(self, message: str, *, expression: object = None, timezone: object = None) -> None:
        super().__init__(message)
        self.expression = expression
        self.timezone = timezone


@dataclass(frozen=True, slots=True)
class Tick:
    """One fire of a schedule."""

    scheduled_for: datetime
    """The fire instant in UTC (tz-aware). It is unique per schedule: use it as the dedupe key."""
    local: datetime
    """The same instant in the schedule's zone (`fold=1` in the second pass of a repeated hour)."""


@dataclass(frozen=True, slots=True)
class GapSkip:
    """A wall-clock time the expression names that did not exist (spring-forward gap)."""

    wall_time: datetime
    """The naive local wall time that was skipped, e.g. `2025-03-30 02:30`."""
    near: datetime
    """A UTC instant just before the jump over `wall_time` (see the module docstring).

    Record the skip under this instant. It is unique per skip, orders skips like their wall
    times, and never equals a fire instant."""


@dataclass(frozen=True)
class CronSchedule:
    """A parsed cron expression in an IANA time zone. Build it with :meth:`parse`.

    Construction validates and compiles the expression once. The methods take UTC instants and
    follow the DST rules in the module docstring. Instances are immutable and safe to share
    between threads. They carry a private cache, which is not part of equality.
    """

    expression: str
    timezone: str = "UTC"
    _engine: _Engine = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_engine", _compile(self.expression, self.timezone))

    @classmethod
    def parse(cls, expression: str, timezone: str = "UTC") -> CronSchedule:
        """Parse `expression` in `timezone`. See the module docstring for the accepted forms.

        Raises :class:`CronError` for an empty, malformed or out-of-range expression, a 7-field
        or `@every` expression, an unknown macro, or an unknown time zone. Equal arguments return
        the same cached instance.
        """
        if cls is CronSchedule and isinstance(expression, str) and isinstance(timezone, str):
            return _parse_cached(expression, timezone)
        return cls(expression, timezone)

    @property
    def zone(self) -> ZoneInfo:
        """The schedule's time zone."""
        return self._engine.zone

    @property
    def repeats_hourly(self) -> bool:
        """True when the hour field matches every hour: such a schedule fires in both passes
        of a repeated (fall-back) hour."""
        return self._engine.interval

    def ticks(self, after: datetime, until: datetime) -> list[Tick]:
        """Every fire instant `t` with `after < t <= until`, in increasing order.

        `after` and `until` must be tz-aware (any zone; they are compared as instants). Returns
        `[]` when `until <= after`. Raises `ValueError` for naive datetimes. The cost grows with
        the number of ticks, so bound catch-up windows (e.g. by the scheduler's maximum delay).
        """
        return self._engine.scan(_utc(after, "after"), _utc(until, "until"))[0]

    def next_ticks(self, after: datetime, n: int) -> list[Tick]:
        """The first `n` fires strictly after `after` (fewer if the schedule ends)."""
        return self._engine.next_ticks(_utc(after, "after"), n)

    def skipped_in_gap(self, after: datetime, until: datetime) -> list[GapSkip]:
        """Wall times the expression names that do not exist, with `after < near <= until`.

        Ordered by `near`, then by `wall_time`. Each non-existent wall time is reported by
        exactly one of any set of adjacent windows.
        """
        return self._engine.scan(_utc(after, "after"), _utc(until, "until"))[1]


def jitter_offset(schedule_key: str, scheduled_for: datetime, jitter_s: float) -> float:
    """A delay in `[0, jitter_s)` seconds, the same for every process given the same tick.

    It comes from SHA-256 of the key and the UTC instant, so all scheduler replicas agree, and
    ticks of many schedules that land on the same second spread out over the window.
    `jitter_s == 0` returns `0.0`. Raises `ValueError` for a negative or non-finite `jitter_s`
    or a naive `scheduled_for`.
    """
    if isinstance(jitter_s, bool) or not math.isfinite(jitter_s) or jitter_s < 0:
        raise ValueError(f"jitter_s must be a finite number of seconds >= 0, got {jitter_s!r}")
    instant = _utc(scheduled_for, "scheduled_for")
    if jitter_s == 0:
        return 0.0
    digest = hashlib.sha256(f"{schedule_key}\n{instant.isoformat()}".encode()).digest()
    fraction = (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)  # exactly < 1
    return min(fraction * jitter_s, math.nextafter(jitter_s, 0.0))


# --- compilation ---------------------------------------------------------------------------


@lru_cache(maxsize=16384)
def _parse_cached(expression: str, timezone: str) -> CronSchedule:
    return CronSchedule(expression, timezone)


def _compile(expression: object, timezone: object) -> _Engine:
    zone = _load_zone(timezone)
    fields = _split(expression)
    names = _NAMES_6 if len(fields) == 6 else _NAMES_5
    _reject_unsupported(fields, names, expression)
    seconds_first = len(fields) == 6
    try:
        parsed = croniter(
            " ".join(fields),
            datetime(2000, 1, 1),
            ret_type=datetime,
            second_at_beginning=seconds_first,
        )
    except CroniterError as exc:
        raise _field_error(fields, expression, exc) from None
    expanded: list[list[object]] = [list(values) for values in parsed.expanded]
    day_fields = fields[-3:]
    all_days = (
        all(expanded[i] == ["*"] for i in (2, 3, 4))
        and not parsed.nth_weekday_of_month
        and not parsed.nearest_weekday
    )
    if not parsed.nearest_weekday and expanded[4] == ["*"]:
        _check_day_exists(expanded[2], expanded[3], expression)
    day_cron = None
    if not all_days:
        day_cron = croniter("0 0 " + " ".join(day_fields), datetime(2000, 1, 1), ret_type=datetime)
        try:
            day_cron.get_next(datetime, start_time=datetime(1999, 12, 31, 23, 59))
        except CroniterBadDateError:
            raise CronError(
                f"cron expression {expression!r} never fires: no day matches "
                f"day-of-month {day_fields[0]!r}, month {day_fields[1]!r} and day-of-week "
                f"{day_fields[2]!r} together",
                expression=expression,
            ) from None
    return _Engine(
        zone=zone,
        seconds=_values(expanded[5], 0, 59) if seconds_first else (0,),
        minutes=_values(expanded[0], 0, 59),
        hours=_values(expanded[1], 0, 23),
        day_cron=day_cron,
    )


def _split(expression: object) -> list[str]:
    if not isinstance(expression, str):
        raise CronError(
            f"a cron expression must be a string, got {type(expression).__name__}; {_FORMS}",
            expression=expression,
        )
    text = expression.strip()
    if not text:
        raise CronError(f"the cron expression is empty; {_FORMS}", expression=expression)
    if text.startswith("@"):
        return _split(MACROS[text.lower()]) if text.lower() in MACROS else _macro_error(text)
    fields = _TOKENS.findall(text)
    if len(fields) == 7:
        raise CronError(
            f"cron expression {expression!r} has 7 fields; a year field is not supported: {_FORMS}",
            expression=expression,
        )
    if len(fields) not in (5, 6):
        raise CronError(
            f"cron expression {expression!r} has {len(fields)} field(s); {_FORMS}",
            expression=expression,
        )
    return fields


def _macro_error(text: str) -> NoReturn:
    word = text.split()[0].lower()
    if word == "@every":
        hint = (
            "'@every' is not supported; write the interval as a step, e.g. '*/5 * * * *' "
            "(every 5 minutes) or '*/10 * * * * *' (every 10 seconds)"
        )
    elif word == "@reboot":
        hint = "'@reboot' is not supported: a scheduler has no boot to run at"
    else:
        hint = f"unknown macro {word!r}"
    raise CronError(
        f"cron expression {text!r}: {hint}; the macros are {', '.join(MACROS)}", expression=text
    )


def _reject_unsupported(fields: list[str], names: tuple[str, ...], expression: object) -> None:
    for name, text in zip(names, fields, strict=True):
        for token in text.lower().split(","):
            if token.startswith("h"):
                raise CronError(
                    f"cron expression {expression!r}: the {name} field {text!r} uses a hashed 'H' "
                    f"value, which is not supported; write the value out, e.g. '17'",
                    expression=expression,
                )
            if token.startswith("r"):
                raise CronError(
                    f"cron expression {expression!r}: the {name} field {text!r} uses a random 'R' "
                    "value, which is not supported (each scheduler process would pick a different "
                    "time); write the value out, e.g. '17'",
                    expression=expression,
                )


def _field_error(fields: list[str], expression: object, exc: Exception) -> CronError:
    """Name the first field that is invalid on its own, or fall back to croniter's words."""
    seconds_first = len(fields) == 6
    names, neutral = (_NAMES_6, _NEUTRAL_6) if seconds_first else (_NAMES_5, _NEUTRAL_5)
    for index, (name, text) in enumerate(zip(names, fields, strict=True)):
        probe = list(neutral)
        probe[index] = text
        try:
            croniter(" ".join(probe), 0.0, second_at_beginning=seconds_first)
        except CroniterError as field_exc:
            return CronError(
                f"cron expression {expression!r}: the {name} field {text!r} is invalid "
                f"({field_exc}); allowed: {_SYNTAX} of {_ALLOWED[name]}",
                expression=expression,
            )
    return CronError(
        f"cron expression {expression!r} is invalid ({exc}); {_FORMS}", expression=expression
    )


def _check_day_exists(days: list[object], months: list[object], expression: object) -> None:
    """Reject day-of-month/month pairs that never occur, like `0 0 30 2 *`."""
    if days == ["*"] or not all(isinstance(d, int) for d in days):
        return
    month_numbers = [m for m in months if isinstance(m, int)] or list(range(1, 13))
    longest = max(_DAYS_IN_MONTH[m - 1] for m in month_numbers)
    if min(d for d in days if isinstance(d, int)) > longest:
        raise CronError(
            f"cron expression {expression!r} never fires: day(s) {days} do not occur in "
            f"month(s) {month_numbers}",
            expression=expression,
        )


def _values(expanded: list[object], low: int, high: int) -> tuple[int, ...]:
    if expanded == ["*"]:
        return tuple(range(low, high + 1))
    return tuple(sorted({int(str(v)) for v in expanded}))


def _load_zone(name: object) -> ZoneInfo:
    if not isinstance(name, str) or not name.strip():
        raise CronError(f"the time zone must be {_ZONE_EXAMPLES}, got {name!r}", timezone=name)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        pass
    raise CronError(
        f"unknown time zone {name!r}{_zone_hint(name)}; use {_ZONE_EXAMPLES}", timezone=name
    )


def _zone_hint(name: str) -> str:
    known = available_timezones()
    by_lower = {key.lower(): key for key in known}
    guess = by_lower.get(name.lower()) or next(
        iter(difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)), None
    )
    return f" (did you mean {guess!r}?)" if guess else ""


def _utc(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime (UTC), got {value!r}")
    return value if value.tzinfo is UTC else value.astimezone(UTC)


# --- evaluation ----------------------------------------------------------------------------

# Inside the engine, instants are naive UTC datetimes. `replace(tzinfo=...)` costs one to two
# microseconds, so the code converts with epoch arithmetic (about 0.2 µs) and keeps the inner
# loop naive. Only the returned objects get a tzinfo.
_Event = tuple[datetime, datetime, int]  # (naive UTC instant, naive wall time, fold 0/1 or _GAP)
_NAIVE_FAR_FUTURE = datetime.max
_EPOCH = datetime(1970, 1, 1)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)


def _naive(instant: datetime) -> datetime:
    return _EPOCH + (instant - _EPOCH_UTC)


def _aware(instant: datetime) -> datetime:
    return _EPOCH_UTC + (instant - _EPOCH)


class _Engine:
    """The compiled schedule plus the memo behind the fast path. Built only by `_compile`.

    The memo `(lo, nxt)` (aware UTC) records that no fire and no gap skip lies strictly between
    those two instants. It is replaced as one tuple, so a concurrent reader sees either the old
    or the new memo, and both are valid.
    """

    __slots__ = (
        "_day_memo",
        "_last",
        "_memo",
        "day_cron",
        "hours",
        "interval",
        "minutes",
        "seconds",
        "zone",
    )

    def __init__(
        self,
        *,
        zone: ZoneInfo,
        seconds: tuple[int, ...],
        minutes: tuple[int, ...],
        hours: tuple[int, ...],
        day_cron: croniter[datetime] | None,
    ) -> None:
        self.zone = zone
        self.seconds = seconds
        self.minutes = minutes
        self.hours = hours
        self.interval = len(hours) == 24
        self.day_cron = day_cron
        self._memo: tuple[datetime, datetime] = (_FAR_FUTURE, _FAR_FUTURE)
        self._last: tuple[datetime, datetime, tuple[Tick, ...], tuple[GapSkip, ...]] | None = None
        self._day_memo: tuple[date, date | None] | None = None

    def scan(self, after: datetime, until: datetime) -> tuple[list[Tick], list[GapSkip]]:
        """Fires and gap skips in `(after, until]` (aware UTC)."""
        if until <= after:
            return [], []
        lo, nxt = self._memo
        if lo <= after and until < nxt:
            return [], []
        last = self._last
        if last is not None and last[0] == after and last[1] == until:
            return list(last[2]), list(last[3])
        start, end = _naive(after), _naive(until)
        ticks: list[Tick] = []
        gaps: list[GapSkip] = []
        seen, upcoming = start, _NAIVE_FAR_FUTURE
        for instant, wall, code in self._events(self._start_wall(after)):
            if instant <= start:
                continue
            if instant > end:
                upcoming = instant
                break
            seen = instant
            if code == _GAP:
                gaps.append(GapSkip(wall, _aware(instant)))
            else:
                ticks.append(self._tick(instant))
        self._memo = (
            after if seen is start else _aware(seen),
            _FAR_FUTURE if upcoming is _NAIVE_FAR_FUTURE else _aware(upcoming),
        )
        self._last = (after, until, tuple(ticks), tuple(gaps))
        return ticks, gaps

    def next_ticks(self, after: datetime, n: int) -> list[Tick]:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {n!r}")
        ticks: list[Tick] = []
        if n <= 0:
            return ticks
        start = _naive(after)
        for instant, _wall, code in self._events(self._start_wall(after)):
            if instant > start and code != _GAP:
                ticks.append(self._tick(instant))
                if len(ticks) >= n:
                    break
        return ticks

    def _tick(self, instant: datetime) -> Tick:
        scheduled_for = _aware(instant)
        return Tick(scheduled_for, scheduled_for.astimezone(self.zone))  # sets fold=1 if repeated

    def _start_wall(self, after: datetime) -> datetime:
        """The wall time to scan from (exclusively) so that no fire after `after` is missed.

        Usually the local wall time of `after`. Inside the first pass of a repeated hour, the
        second pass of earlier wall times still lies ahead, so start one overlap earlier.
        """
        local = after.astimezone(self.zone)
        offset = local.utcoffset()
        assert offset is not None
        wall = _naive(after) + offset
        if local.fold == 0:
            first, second = self.zone.utcoffset(wall), self.zone.utcoffset(wall.replace(fold=1))
            if first is not None and second is not None and second < first:
                wall -= first - second
        return wall

    def _events(self, start: datetime) -> Iterator[_Event]:
        """Fires and gap skips for wall times after `start`, in order of UTC instant.

        The fold-0 instants of existing wall times grow with the wall time. Second passes of a
        repeated hour, and the instant of a gap, come later than the wall times around them.
        They wait in a heap until an existing wall time passes them.
        """
        utcoffset = self.zone.utcoffset
        interval = self.interval
        pending: list[_Event] = []
        gap: tuple[datetime, timedelta, timedelta] | None = None
        for wall, wall_fold1 in self._wall_times_after(start):
            off0, off1 = utcoffset(wall), utcoffset(wall_fold1)
            assert off0 is not None and off1 is not None  # a ZoneInfo always has an offset
            if off0 < off1:  # does not exist: spring-forward gap
                if gap is None or not (gap[0] + gap[1] <= wall < gap[0] + gap[2]):
                    gap = (_transition(self.zone, wall, off0, off1), off0, off1)
                heapq.heappush(pending, (_gap_instant(gap[0], gap[0] + gap[2], wall), wall, _GAP))
                continue
            first = wall - off0
            while pending and pending[0][0] <= first:
                yield heapq.heappop(pending)
            yield first, wall, 0
            if off0 > off1 and interval:  # repeated, and the hour field is '*': fire again
                heapq.heappush(pending, (wall - off1, wall, 1))
        while pending:
            yield heapq.heappop(pending)

    def _wall_times_after(self, start: datetime) -> Iterator[tuple[datetime, datetime]]:
        """Matching naive wall times strictly after `start`, ascending, existing or not.

        Each comes twice, with `fold=0` and `fold=1`: building both is cheaper than `replace`.
        """
        first_day = start.date()
        day = self._next_day(first_day)
        while day is not None:
            yield from self._times_on(day, start.time() if day == first_day else None)
            try:
                day = self._next_day(day + _ONE_DAY)
            except OverflowError:
                return

    def _times_on(self, day: date, after: time | None) -> Iterator[tuple[datetime, datetime]]:
        y, mo, d = day.year, day.month, day.day
        minutes, seconds = self.minutes, self.seconds
        hours = self.hours if after is None else self.hours[bisect_left(self.hours, after.hour) :]
        for h in hours:
            if after is None or h > after.hour:
                for m in minutes:
                    for s in seconds:
                        yield datetime(y, mo, d, h, m, s), datetime(y, mo, d, h, m, s, fold=1)
                continue
            for m in minutes[bisect_left(minutes, after.minute) :]:
                later = (
                    seconds if m > after.minute else seconds[bisect_right(seconds, after.second) :]
                )
                for s in later:
                    yield datetime(y, mo, d, h, m, s), datetime(y, mo, d, h, m, s, fold=1)

    def _next_day(self, day: date) -> date | None:
        """The first day on or after `day` that the day fields match; None if there is none."""
        if self.day_cron is None:
            return day
        memo = self._day_memo
        if memo is not None and memo[0] <= day and (memo[1] is None or day <= memo[1]):
            return memo[1]
        cron = copy.copy(self.day_cron)  # croniter keeps a cursor; a copy keeps this thread-safe
        try:
            found: date | None = cron.get_next(
                datetime, start_time=datetime.combine(day, time()) - _MINUTE
            ).date()
        except (CroniterBadDateError, OverflowError, ValueError):
            found = None  # no match within croniter's 50-year horizon, or past year 9999
        self._day_memo = (day, found)
        return found


def _gap_instant(jump: datetime, gap_end: datetime, wall: datetime) -> datetime:
    """The `near` instant of a skipped wall time: just before the jump, unique per wall time.

    It is `jump` minus one microsecond per second from `wall` to `gap_end`, the first wall time
    after the gap. It stays before the jump and keeps the order of the wall times. It is never
    a whole second, so it never equals a fire instant, which is always a whole second. A store
    keyed on (schedule, instant) can therefore hold every fire and every skip.
    """
    return jump - timedelta(microseconds=(gap_end - wall) // _SECOND)


def _transition(zone: ZoneInfo, wall: datetime, before: timedelta, after: timedelta) -> datetime:
    """The naive UTC instant at which the clocks jumped over the non-existent `wall`.

    It lies in `(wall - after, wall - before]`. Transitions fall on whole seconds, so bisect.
    """
    lo, hi = wall - after, wall - before
    span = int((hi - lo).total_seconds())
    while span > 1:
        mid = lo + timedelta(seconds=span // 2)
        if _aware(mid).astimezone(zone).utcoffset() == before:
            lo, span = mid, span - span // 2
        else:
            hi, span = mid, span // 2
    return hi
