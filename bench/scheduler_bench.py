"""What the cron scheduler costs with many schedules due at the same minute: fire lag and CPU.

    python bench/scheduler_bench.py [--database sqlite|postgres|both] [--schedules N ...]
                                    [--minutes M] [--profile] [--json out.json]

For each ledger and each N (default 1,000 and 10,000), the bench writes N job files with
``schedule = "* * * * *"`` (second 0 of every minute, ``concurrency = "allow"``, so the queued
runs, which no worker takes, never make a tick skip) into a temporary folder, opens a fresh ledger
(a SQLite file in the temporary folder, or a database ``jr_sched_bench_<random>`` on
127.0.0.1:5432, dropped afterwards) and runs ``Scheduler.run()`` in this process through M minute
boundaries (default 2). Then it reads the ledger:

* **lag** of each fire of those minutes: the run's ``created_at`` minus ``scheduled_for`` (the
  moment the run is queued and a worker could take it), p50 / p99 / max;
* **decided**: when the last fire of a minute was recorded, after the minute began (max lag);
* **exactly once**: every schedule has exactly one fire row per minute, ``fired``, with its own
  run, and the runs table holds exactly one run per fire.

CPU is this process's (``resource.getrusage``: the scheduler's event loop and its worker
threads; the bench's own polling, one COUNT a second, is included), split into the first load of
the job files, each minute's burst (from 1 s before the minute until its last fire was recorded)
and the idle rate between minutes (re-reading the folder every 2 s) as a share of one core. On
PostgreSQL the server's CPU for the bench database's connections is shown too (``/proc``).

``--profile`` adds a cProfile of one in-process ``Scheduler.step`` at a due minute, after
``Scheduler.prepare`` a second before it as ``run()`` does (on a fake clock, store calls run
inline so the profile sees them) and of one re-read of the unchanged
folder, and prints the top functions by cumulative and own time.
Numbers go into docs/performance.md ("Scheduler").
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import resource
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import sqlalchemy as sa

from jobrunner.clock import Clock
from jobrunner.scheduler import Scheduler
from jobrunner.store import Store
from jobrunner.store.tables import METADATA

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
APP = "jobrunner-local"
TICK = os.sysconf("SC_CLK_TCK")
MINUTE = timedelta(minutes=1)
DECIDE_BOUND = 240.0  # seconds to wait for a minute's fires before giving up on it
FIRES = METADATA.tables["schedule_fires"]
RUNS = METADATA.tables["runs"]


# ---- measuring ---------------------------------------------------------------------------------


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Database:
    """A fresh ledger, removed afterwards."""

    kind: str
    url: str
    name: str | None = None

    def server_cpu(self) -> float:
        """CPU seconds of the PostgreSQL backends connected to this database (0 on SQLite)."""
        if self.name is None:
            return 0.0
        engine = sa.create_engine(ADMIN_URL, poolclass=sa.NullPool)
        try:
            with engine.connect() as db:
                pids = db.execute(
                    sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :d"),
                    {"d": self.name},
                ).scalars()
                return sum(proc_cpu(pid) for pid in pids)
        finally:
            engine.dispose()


@contextmanager
def fresh_database(kind: str, folder: Path) -> Iterator[Database]:
    if kind == "sqlite":
        yield Database(kind, f"sqlite:///{folder / 'ledger.db'}")
        return
    name = f"jr_sched_bench_{secrets.token_hex(6)}"
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as db:
        db.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield Database(kind, ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", name)
    finally:
        with admin.connect() as db:
            db.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def write_jobs(folder: Path, count: int, schedule: str = "* * * * *") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"s{index:05d}.toml").write_text(
            f'name = "s{index:05d}"\nimage = "alpine"\ncmd = ["true"]\n'
            f'schedule = "{schedule}"\nconcurrency = "allow"\n'
        )


# ---- one case ----------------------------------------------------------------------------------


@dataclass
class MinuteResult:
    minute: str
    fires: int
    decided_s: float  # last fire recorded, after the minute began
    burst_cpu_s: float


@dataclass
class CaseResult:
    database: str
    schedules: int
    load_s: float
    load_cpu_s: float
    minutes: list[MinuteResult] = field(default_factory=list)
    lag_p50: float = float("nan")
    lag_p99: float = float("nan")
    lag_max: float = float("nan")
    idle_cpu_share: float = float("nan")
    server_cpu_s: float = 0.0
    problems: list[str] = field(default_factory=list)


def fires_of_minute(url: str, minute: datetime) -> int:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as db:
            query = sa.select(sa.func.count()).where(FIRES.c.scheduled_for == minute)
            return int(db.execute(query).scalar_one())
    finally:
        engine.dispose()


def run_case(kind: str, count: int, minutes: int, root: Path) -> CaseResult:
    folder = root / f"{kind}-{count}"
    jobs_dir = folder / "jobs"
    write_jobs(jobs_dir, count)
    with fresh_database(kind, folder) as database:
        store = Store(database.url)
        try:
            return anyio.run(measure, store, database, jobs_dir, count, minutes)
        finally:
            store.close()


async def measure(
    store: Store, database: Database, jobs_dir: Path, count: int, minutes: int
) -> CaseResult:
    scheduler = Scheduler(store, backend="local", app=APP, jobs_dir=jobs_dir)
    server_before = database.server_cpu()
    cpu0, wall0 = self_cpu(), time.monotonic()
    await scheduler.load()
    result = CaseResult(
        database.kind, count, time.monotonic() - wall0, self_cpu() - cpu0, server_cpu_s=0.0
    )
    assert len(scheduler.schedules) == count, len(scheduler.schedules)
    started = datetime.now(UTC)
    first = started.replace(second=0, microsecond=0) + MINUTE
    wanted = [first + i * MINUTE for i in range(minutes)]
    samples: list[tuple[datetime, float]] = []  # (wall time, cpu) every 0.1 s
    done: dict[datetime, datetime] = {}

    async def sample() -> None:
        while True:
            samples.append((datetime.now(UTC), self_cpu()))
            await anyio.sleep(0.1)

    async def watch() -> None:
        for minute in wanted:
            while datetime.now(UTC) < minute + timedelta(seconds=0.5):
                await anyio.sleep(0.1)
            deadline = time.monotonic() + DECIDE_BOUND
            while time.monotonic() < deadline:
                n = await anyio.to_thread.run_sync(fires_of_minute, database.url, minute)
                if n >= count:
                    break
                await anyio.sleep(1.0)
            done[minute] = datetime.now(UTC)
        scheduler.stop()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        tg.start_soon(watch)
        await scheduler.run()
        tg.cancel_scope.cancel()
    result.server_cpu_s = database.server_cpu() - server_before
    check_ledger(result, database.url, wanted, count, samples)
    return result


def cpu_at(samples: list[tuple[datetime, float]], moment: datetime) -> float:
    before = [cpu for at, cpu in samples if at <= moment]
    return before[-1] if before else samples[0][1]


def check_ledger(
    result: CaseResult,
    url: str,
    wanted: list[datetime],
    count: int,
    samples: list[tuple[datetime, float]],
) -> None:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as db:
            rows = db.execute(
                sa.select(
                    FIRES.c.schedule,
                    FIRES.c.scheduled_for,
                    FIRES.c.decision,
                    FIRES.c.reason,
                    FIRES.c.run_id,
                    RUNS.c.created_at,
                    RUNS.c.job_name,
                ).outerjoin(RUNS, RUNS.c.id == FIRES.c.run_id)
            ).all()
            run_count = db.execute(sa.select(sa.func.count()).select_from(RUNS)).scalar_one()
    finally:
        engine.dispose()
    lags: list[float] = []
    per_minute: dict[datetime, list[float]] = {m: [] for m in wanted}
    keys: Counter[tuple[str, datetime]] = Counter()
    wrong: Counter[str] = Counter()
    for row in rows:
        scheduled, created = row.scheduled_for, row.created_at
        keys[(row.schedule, scheduled)] += 1
        if scheduled not in per_minute:
            continue
        if row.decision != "fired" or created is None or row.job_name != row.schedule:
            wrong[f"{scheduled:%H:%M} {row.decision} {(row.reason or '').split(':')[0]}"] += 1
            continue
        lag = (created - scheduled).total_seconds()
        lags.append(lag)
        per_minute[scheduled].append(lag)
    result.problems += [f"{what}: {n}" for what, n in sorted(wrong.items())]
    doubled = [k for k, n in keys.items() if n > 1]
    if doubled:
        result.problems.append(f"{len(doubled)} ticks decided twice")
    fired_rows = sum(1 for r in rows if r.run_id is not None)
    if run_count != fired_rows or len({r.run_id for r in rows if r.run_id}) != fired_rows:
        result.problems.append(f"{run_count} runs for {fired_rows} fired rows")
    for minute, minute_lags in per_minute.items():
        names = {s for s, m in keys if m == minute}
        if len(names) != count:
            result.problems.append(f"{minute:%H:%M}: {count - len(names)} schedules not decided")
        decided = max(minute_lags, default=float("nan"))
        end = minute + timedelta(seconds=decided if minute_lags else 0) + timedelta(seconds=0.2)
        burst = cpu_at(samples, end) - cpu_at(samples, minute - timedelta(seconds=1))
        result.minutes.append(MinuteResult(f"{minute:%H:%M}", len(minute_lags), decided, burst))
    if lags:
        result.lag_p50 = statistics.median(lags)
        result.lag_p99 = percentile(lags, 0.99)
        result.lag_max = max(lags)
    # Idle: from 5 s after the first minute was decided to 2 s before the next one.
    if len(wanted) >= 2 and result.minutes and not math.isnan(result.minutes[0].decided_s):
        start = wanted[0] + timedelta(seconds=result.minutes[0].decided_s + 5)
        end = wanted[1] - timedelta(seconds=2)
        if end > start:
            spent = cpu_at(samples, end) - cpu_at(samples, start)
            result.idle_cpu_share = spent / (end - start).total_seconds()


# ---- profile -----------------------------------------------------------------------------------


class FixedClock(Clock):
    """Wall time that moves only when told (monotonic time moves with it)."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def time(self) -> float:
        return self.at.timestamp()

    def monotonic(self) -> float:
        return self.at.timestamp()


@contextmanager
def inline_threads() -> Iterator[None]:
    """Run ``anyio.to_thread.run_sync`` calls inline, so cProfile (one thread) sees them."""
    original = anyio.to_thread.run_sync

    async def inline(func: Callable[..., Any], *args: Any, **_: Any) -> Any:
        return func(*args)

    anyio.to_thread.run_sync = inline  # type: ignore[assignment]
    try:
        yield
    finally:
        anyio.to_thread.run_sync = original


def profile_case(kind: str, count: int, root: Path, top: int) -> str:
    folder = root / f"profile-{kind}-{count}"
    jobs_dir = folder / "jobs"
    write_jobs(jobs_dir, count)
    out = io.StringIO()
    with fresh_database(kind, folder) as database:
        clock = FixedClock(datetime(2027, 1, 4, 8, 59, 50, tzinfo=UTC))
        store = Store(database.url, clock=clock)
        try:

            async def go() -> None:
                scheduler = Scheduler(
                    store, backend="local", app=APP, jobs_dir=jobs_dir, clock=clock
                )
                with inline_threads():
                    await scheduler.load()
                    # As Scheduler.run does: the minute's decisions are prepared ahead of it.
                    clock.at = datetime(2027, 1, 4, 8, 59, 59, tzinfo=UTC)
                    await scheduler.prepare()
                    clock.at = datetime(2027, 1, 4, 9, 0, 0, 50_000, tzinfo=UTC)
                    for what, call in (
                        ("Scheduler.step at the due minute", scheduler.step),
                        ("Scheduler.load of the unchanged folder", scheduler.load),
                    ):
                        profiler = cProfile.Profile()
                        wall, cpu = time.perf_counter(), self_cpu()
                        profiler.enable()
                        report = await call()
                        profiler.disable()
                        wall, cpu = time.perf_counter() - wall, self_cpu() - cpu
                        fired = getattr(report, "fired", "")
                        print(
                            f"\n=== {kind}, {count} schedules: {what}: {wall:.2f} s wall, "
                            f"{cpu:.2f} s CPU (under cProfile) {fired and f'{fired} fired'}",
                            file=out,
                        )
                        for order in ("cumulative", "tottime"):
                            stats = pstats.Stats(profiler, stream=out)
                            stats.sort_stats(order).print_stats(top)

            anyio.run(go)
        finally:
            store.close()
    return out.getvalue()


# ---- main --------------------------------------------------------------------------------------


def table(results: list[CaseResult]) -> str:
    lines = [
        "| ledger | schedules | load (CPU) | lag p50 / p99 / max | last fire of each minute | "
        "CPU per minute | idle CPU | PG server CPU | checks |",
        "|---|---:|---|---|---|---|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.database} | {r.schedules:,} | {r.load_s:.1f} s ({r.load_cpu_s:.1f} s) | "
            f"{r.lag_p50:.2f} / {r.lag_p99:.2f} / {r.lag_max:.2f} s | "
            + ", ".join(f"{m.decided_s:.2f} s" for m in r.minutes)
            + " | "
            + ", ".join(f"{m.burst_cpu_s:.2f} s" for m in r.minutes)
            + f" | {r.idle_cpu_share:.0%} | "
            + (f"{r.server_cpu_s:.1f} s" if r.database == "postgresql" else "-")
            + " | "
            + ("ok" if not r.problems else "; ".join(r.problems[:3]))
            + " |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--schedules", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--minutes", type=int, default=2, help="minute boundaries to measure")
    parser.add_argument("--profile", action="store_true", help="cProfile one due step")
    parser.add_argument("--profile-only", action="store_true", help="only the profile")
    parser.add_argument("--top", type=int, default=25, help="functions shown per profile")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    root = Path(tempfile.mkdtemp(prefix="jr-sched-bench-"))
    results: list[CaseResult] = []
    try:
        if not args.profile_only:
            for kind in kinds:
                for count in args.schedules:
                    print(f"{kind}, {count} schedules, {args.minutes} minutes...", flush=True)
                    result = run_case(kind, count, args.minutes, root)
                    result.database = "postgresql" if kind == "postgres" else kind
                    results.append(result)
                    print(table([result]).splitlines()[-1], flush=True)
            print()
            print(table(results))
        if args.profile or args.profile_only:
            for kind in kinds:
                print(profile_case(kind, max(args.schedules), root, args.top))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    bad = [r for r in results if r.problems]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
