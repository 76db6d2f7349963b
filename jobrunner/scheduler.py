"""Cron schedules: decide every tick of every scheduled job exactly once, and queue what fires.

The scheduler reads the job files of a folder (and notices changes without a restart), keeps
each cron schedule's next tick in a heap, and when ticks fall due decides each one: **fired**
(a queued run, which any ``jobrunner worker`` then runs) or **skipped**, with the reason. Every
decision is a row in ``schedule_fires``; nothing is dropped silently.

Exactly once: a decision row is unique on (schedule, scheduled_for), and the row and its run
are written in one transaction. Several schedulers sharing one ledger (processes on one host
with SQLite, hosts with PostgreSQL) all compute the same ticks; whichever inserts a tick's row
first decides it, and the others' inserts do nothing.

Downtime: the ledger keeps, per schedule, the time up to which its ticks are decided. A
scheduler that starts after downtime finds the ticks it missed and applies the job's
``catch_up`` rule (``none``: skip them all; ``latest``: fire the newest one; ``all``: fire up to
``catch_up_limit``), then ``starting_deadline`` (a tick decided more than that long after its
time is skipped), then ``concurrency`` (``forbid``: skip while an earlier run of the schedule is
unfinished; ``replace``: cancel that run and fire; ``allow``: fire anyway). Time zones and
daylight saving are :mod:`jobrunner.cron`'s.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import anyio

from jobrunner.clock import SYSTEM_CLOCK, Clock
from jobrunner.cron import CronSchedule, Tick, jitter_offset
from jobrunner.spec import Job, JobSpecError
from jobrunner.store import Fire, FireDecision, PreparedFires, RunRequest, Store

__all__ = ["ScheduledJob", "Scheduler", "StepReport"]

logger = logging.getLogger(__name__)

# A tick older than this when it is decided was missed (no scheduler was up): catch_up applies.
MISSED_AFTER = timedelta(seconds=5)
# How often the job files are looked at for changes, and finished runs pruned.
RELOAD_EVERY = 2.0
PRUNE_EVERY = 60.0
# How long before a tick its decisions are worked out and its runs' rows built, so that at the
# tick itself only the inserts remain (10,000 schedules due at one minute: see
# docs/performance.md, "Scheduler").
LOOKAHEAD = 5.0
QUEUE = "default"


@dataclass(frozen=True)
class ScheduledJob:
    """A job with a cron schedule, as loaded from its file."""

    job: Job
    cron: CronSchedule
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.job.name

    @classmethod
    def of(cls, job: Job, path: Path | None = None) -> ScheduledJob:
        assert job.schedule is not None and not job.native
        return cls(job, CronSchedule.parse(job.schedule, job.timezone or "UTC"), path)

    @cached_property
    def snapshot(self) -> dict[str, Any]:
        """``job.snapshot()``, computed once: every run of the schedule stores the same one."""
        return self.job.snapshot()


@dataclass
class StepReport:
    """What one pass decided."""

    fires: list[Fire] = field(default_factory=list)

    @property
    def fired(self) -> int:
        return sum(f.decision == "fired" for f in self.fires)

    @property
    def skipped(self) -> int:
        return sum(f.decision == "skipped" for f in self.fires)


@dataclass
class _Ahead:
    """Decisions prepared before their moment (``Scheduler.prepare``)."""

    moment: datetime
    schedules: dict[str, ScheduledJob]  # the schedules covered, as loaded when prepared
    prepared: PreparedFires
    taken: set[str] = field(default_factory=set)  # recorded as prepared at the tick


class Scheduler:
    """Decides the ticks of the cron-scheduled jobs in ``jobs_dir`` (or given ``jobs``)."""

    def __init__(
        self,
        store: Store,
        *,
        backend: str,
        app: str,
        jobs_dir: Path | None = None,
        jobs: Sequence[Job] = (),
        clock: Clock = SYSTEM_CLOCK,
        interval: float = 1.0,
        on_fired: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.app = app
        self.jobs_dir = jobs_dir
        self.clock = clock
        self.interval = interval
        self._on_fired = on_fired  # e.g. wake this host's idle workers
        self._schedules: dict[str, ScheduledJob] = {}
        self._heap: list[tuple[datetime, str]] = []
        self._files: dict[Path, tuple[int, int]] = {}
        self._problems: dict[Path, str] = {}
        self._last_reload = float("-inf")
        self._last_prune = float("-inf")
        self._fired_since_prune: set[str] = set()
        self._stopping = anyio.Event()
        self._ahead: _Ahead | None = None
        self._fixed = [ScheduledJob.of(j) for j in jobs if j.schedule and not j.native]

    # ---- which jobs ---------------------------------------------------------------------------

    @property
    def schedules(self) -> Mapping[str, ScheduledJob]:
        return self._schedules

    async def load(self) -> None:
        """(Re)read the job files that changed; start tracking new schedules from now."""
        found = {s.name: s for s in self._fixed}
        if self.jobs_dir is not None:
            found.update(await anyio.to_thread.run_sync(self._scan))
        new = [name for name in found if name not in self._schedules]
        if new:
            await anyio.to_thread.run_sync(
                lambda: self.store.ensure_schedules(new, since=self.clock.now())
            )
        changed = {n for n, s in found.items() if self._schedules.get(n) != s}
        gone = set(self._schedules) - set(found)
        for name in gone:
            logger.info("schedule %s removed (its job file is gone or no longer scheduled)", name)
        self._schedules = found
        if changed or gone:
            states = await self.ledger_states(list(found))
            self._heap = []
            now = self.clock.now()
            for name, scheduled in found.items():
                wake = self._next_wake(scheduled, states.get(name, now))
                if wake is not None:
                    self._heap.append((wake, name))
            heapq.heapify(self._heap)

    async def ledger_states(self, names: Sequence[str]) -> dict[str, datetime]:
        states = await anyio.to_thread.run_sync(self.store.schedule_states, names)
        return {name: state.decided_until for name, state in states.items()}

    def _scan(self) -> dict[str, ScheduledJob]:
        """The cron-scheduled jobs of the folder; a file that no longer loads keeps its last
        good version (with a warning), so a typo does not silently stop a schedule."""
        from jobrunner.spec.loader import discover_jobs

        assert self.jobs_dir is not None
        previous = {s.path: s for s in self._schedules.values() if s.path is not None}
        if self._files and self._unchanged():
            return {s.name: s for s in previous.values()}
        result: dict[str, ScheduledJob] = {}
        seen: dict[Path, tuple[int, int]] = {}
        for path, loaded in discover_jobs(self.jobs_dir):
            try:
                stat = path.stat()
            except OSError:
                continue
            seen[path] = (stat.st_mtime_ns, stat.st_size)
            if isinstance(loaded, JobSpecError):
                message = str(loaded)
                if self._problems.get(path) != message:
                    logger.warning("job file %s does not load (%s)", path, message)
                    self._problems[path] = message
                if path in previous:
                    result[previous[path].name] = previous[path]
                continue
            self._problems.pop(path, None)
            if loaded.schedule is None or loaded.native:
                continue
            if path in previous and self._files.get(path) == seen[path]:
                result[loaded.name] = previous[path]
            else:
                result[loaded.name] = ScheduledJob.of(loaded, path)
                _ = result[loaded.name].snapshot  # here, in a worker thread, not when it fires
        self._files = seen
        return result

    def _unchanged(self) -> bool:
        """Whether the folder holds the same files, none modified, as at the last scan (then
        nothing needs parsing again: a stat per file, not a parse per file every RELOAD_EVERY)."""
        assert self.jobs_dir is not None
        paths = list(self.jobs_dir.glob("*.toml"))
        if len(paths) != len(self._files):
            return False
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                return False
            if self._files.get(path) != (stat.st_mtime_ns, stat.st_size):
                return False
        return True

    # ---- running ------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Decide ticks until ``stop()``: wake for the next tick (or every ``interval``)."""
        while not self._stopping.is_set():
            try:
                await self.prepare()
                await self.step()
            except Exception as exc:  # the ledger is down, a file cannot be read: try again
                logger.warning("scheduler pass failed (retrying): %s", exc)
            with anyio.move_on_after(self._pause()):
                await self._stopping.wait()

    @staticmethod
    def _next_wake(scheduled: ScheduledJob, since: datetime) -> datetime | None:
        """When the schedule next needs a decision: its next tick, or a daylight-saving gap
        before it (recorded as a skip when it passes, not a day later with the next tick)."""
        upcoming = scheduled.cron.next_ticks(since, 1)
        if not upcoming:
            return None
        tick = upcoming[0].scheduled_for
        gaps = scheduled.cron.skipped_in_gap(since, tick)
        return min([tick, *(g.near for g in gaps)])

    def _pause(self) -> float:
        if not self._heap:
            return self.interval
        until_next = (self._heap[0][0] - self.clock.now()).total_seconds()
        if self._ahead is None or self._ahead.moment != self._heap[0][0]:
            until_next -= LOOKAHEAD  # wake to prepare it first
        return max(0.0, min(self.interval, until_next))

    async def prepare(self) -> None:
        """Work out the next due moment's decisions ahead of it, when it is near.

        Only what cannot change before the tick is prepared: schedules with ``concurrency =
        allow`` (their decision does not depend on runs that may finish in the meantime), not
        paused, on time. At the tick ``step`` checks the pause flags again and re-decides any
        schedule whose job file, pause state or deadline changed since; the rest is inserted
        as prepared."""
        if not self._heap:
            return
        moment = self._heap[0][0]
        now = self.clock.now()
        if moment <= now or (moment - now).total_seconds() > LOOKAHEAD:
            return
        if self._ahead is not None and self._ahead.moment == moment:
            return
        names = [name for wake, name in self._heap if wake == moment and name in self._schedules]
        candidates = {
            name: self._schedules[name]
            for name in names
            if self._schedules[name].job.concurrency == "allow"
            and not self._schedules[name].job.paused
        }
        states = await anyio.to_thread.run_sync(self.store.schedule_states, list(candidates))

        def work_out() -> tuple[dict[str, ScheduledJob], PreparedFires]:
            # In a thread: for 10,000 schedules this is a few hundred ms of CPU that would
            # otherwise stall the event loop (a worker's, when it runs the scheduler).
            decisions: list[FireDecision] = []
            covered: dict[str, ScheduledJob] = {}
            for name, scheduled in candidates.items():
                state = states.get(name)
                if state is None or state.paused:
                    continue
                made = self._decisions(scheduled, state.decided_until, moment, False, False)
                if any(d.scheduled_for > moment for d in made):
                    continue
                covered[name] = scheduled
                decisions += made
            return covered, self.store.prepare_fires(decisions)

        covered, prepared = await anyio.to_thread.run_sync(work_out)
        self._ahead = _Ahead(moment, covered, prepared)

    async def step(self) -> StepReport:
        """One pass at the clock's now: reload files if due, decide the ticks that are due.

        When ticks are due they are decided first and the files re-read after them, so a
        minute that fires many schedules does not also wait for the folder to be read."""
        reload = self.clock.monotonic() - self._last_reload >= RELOAD_EVERY
        if reload and not (self._heap and self._heap[0][0] <= self.clock.now()):
            await self._reload()
            reload = False
        now = self.clock.now()
        due: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            _, name = heapq.heappop(self._heap)
            if name in self._schedules:
                due.append(name)
        report = StepReport()
        ahead = self._ahead
        if ahead is not None and ahead.moment <= now:
            self._ahead = None  # used now (or too late to use): prepared once, taken once
        else:
            ahead = None  # for a moment still to come: kept until then
        decided: dict[str, datetime] = {}
        if due and ahead is not None:
            taken = await self._record_ahead(ahead, due, now)
            report.fires += taken
            decided = dict.fromkeys(ahead.taken, ahead.moment)
        rest = [name for name in due if name not in decided]
        if rest:
            report.fires += await self._decide(rest, now)
        for name in due:
            wake = self._next_wake(self._schedules[name], decided.get(name, now))
            if wake is not None:
                heapq.heappush(self._heap, (wake, name))
        if reload:
            await self._reload()
        await self._prune()
        return report

    async def _reload(self) -> None:
        self._last_reload = self.clock.monotonic()
        await self.load()

    async def trigger(self, name: str) -> Fire:
        """Fire ``name`` now, outside its schedule (recorded with trigger ``manual``)."""
        scheduled = self._schedules.get(name)
        if scheduled is None:
            raise KeyError(name)
        now = self.clock.now()
        decision = FireDecision(
            name, now, "fired", "triggered by hand", "manual", self._request(scheduled, now, now)
        )
        fires = await anyio.to_thread.run_sync(
            lambda: self.store.record_fires([decision], decided_until={})
        )
        if self._on_fired is not None:
            self._on_fired()
        return fires[0]

    # ---- deciding -----------------------------------------------------------------------------

    async def _record_ahead(self, ahead: _Ahead, due: list[str], now: datetime) -> list[Fire]:
        """Record the prepared decisions that still hold; ``ahead.taken`` says whose."""
        if now < ahead.moment or now - ahead.moment > MISSED_AFTER:
            return []
        paused = await anyio.to_thread.run_sync(self.store.paused_schedules)
        late = (now - ahead.moment).total_seconds()
        keep = {
            name
            for name in due
            if ahead.schedules.get(name) is not None
            and ahead.schedules[name] is self._schedules.get(name)  # file unchanged since
            and name not in paused
            and _within(ahead.schedules[name].job.starting_deadline, late)
        }
        prepared = ahead.prepared
        if keep != set(ahead.schedules):
            prepared = prepared.only(keep)
        fires = await anyio.to_thread.run_sync(
            lambda: self.store.record_fires(
                prepared, decided_until=dict.fromkeys(keep, ahead.moment)
            )
        )
        ahead.taken = keep
        self._after_fires(fires)
        return fires

    async def _decide(self, names: list[str], now: datetime) -> list[Fire]:
        states = await anyio.to_thread.run_sync(self.store.schedule_states, names)
        paused = {n for n, s in states.items() if s.paused}
        # Only the overlap rules look at unfinished runs; "allow" schedules need no query.
        watched = [n for n in names if self._schedules[n].job.concurrency != "allow"]
        running = await anyio.to_thread.run_sync(self.store.running_schedules, watched)
        decisions: list[FireDecision] = []
        for name in names:
            scheduled = self._schedules[name]
            since = states[name].decided_until if name in states else now
            decisions += self._decisions(scheduled, since, now, name in paused, name in running)
        if not decisions:
            await anyio.to_thread.run_sync(
                lambda: self.store.record_fires([], decided_until=dict.fromkeys(names, now))
            )
            return []
        fires = await anyio.to_thread.run_sync(
            lambda: self.store.record_fires(decisions, decided_until=dict.fromkeys(names, now))
        )
        self._after_fires(fires)
        return fires

    def _after_fires(self, fires: list[Fire]) -> None:
        fired = {f.schedule for f in fires if f.decision == "fired"}
        self._fired_since_prune.update(fired)
        if fired and self._on_fired is not None:
            self._on_fired()

    def _decisions(
        self, scheduled: ScheduledJob, since: datetime, now: datetime, paused: bool, running: bool
    ) -> list[FireDecision]:
        job, name = scheduled.job, scheduled.name
        ticks = scheduled.cron.ticks(since, now)
        out: list[FireDecision] = [
            FireDecision(
                name,
                gap.near,
                "skipped",
                f"dst_gap: {gap.wall_time:%Y-%m-%d %H:%M:%S} does not exist in "
                f"{scheduled.cron.timezone} (clocks moved forward)",
            )
            for gap in scheduled.cron.skipped_in_gap(since, now)
        ]
        if paused or job.paused:
            where = "in the job file" if job.paused else "by `jobrunner schedules pause`"
            return out + [
                FireDecision(name, t.scheduled_for, "skipped", f"paused: paused {where}")
                for t in ticks
            ]
        fire: list[tuple[Tick, str]] = []
        missed = [t for t in ticks if now - t.scheduled_for > MISSED_AFTER]
        on_time = [t for t in ticks if now - t.scheduled_for <= MISSED_AFTER]
        keep_missed = self._catch_up(job, missed, bool(on_time))
        for tick in missed:
            if tick in keep_missed:
                fire.append((tick, "catch_up"))
            else:
                out.append(self._skip_missed(name, job, tick, bool(on_time)))
        fire += [(t, "cron") for t in on_time]
        if job.starting_deadline is not None:
            late = [
                (t, trig)
                for t, trig in fire
                if (now - t.scheduled_for).total_seconds() > job.starting_deadline
            ]
            for tick, _ in late:
                seconds = (now - tick.scheduled_for).total_seconds()
                out.append(
                    FireDecision(
                        name,
                        tick.scheduled_for,
                        "skipped",
                        f"deadline: {seconds:.1f}s late, starting_deadline is "
                        f"{job.starting_deadline:g}s",
                    )
                )
            fire = [f for f in fire if f not in late]
        out += self._apply_concurrency(scheduled, fire, running, now)
        return out

    @staticmethod
    def _catch_up(job: Job, missed: list[Tick], on_time: bool) -> list[Tick]:
        if not missed or job.catch_up == "none":
            return []
        if job.catch_up == "latest":
            return [] if on_time else missed[-1:]
        return missed[-job.catch_up_limit :]

    @staticmethod
    def _skip_missed(name: str, job: Job, tick: Tick, on_time: bool) -> FireDecision:
        if job.catch_up == "none":
            why = "missed while no scheduler ran (catch_up = none)"
        elif job.catch_up == "latest":
            newer = "an on-time tick" if on_time else "a newer missed tick"
            why = f"missed while no scheduler ran; catch_up = latest fires {newer} instead"
        else:
            why = f"missed while no scheduler ran; beyond catch_up_limit = {job.catch_up_limit}"
        return FireDecision(name, tick.scheduled_for, "skipped", f"catch_up: {why}")

    def _apply_concurrency(
        self,
        scheduled: ScheduledJob,
        fire: list[tuple[Tick, str]],
        running: bool,
        now: datetime,
    ) -> list[FireDecision]:
        job, name = scheduled.job, scheduled.name
        out: list[FireDecision] = []
        if not fire:
            return out
        if job.concurrency == "forbid":
            if running:
                return [
                    FireDecision(
                        name,
                        t.scheduled_for,
                        "skipped",
                        "overlap: an earlier run of this schedule is unfinished "
                        "(concurrency = forbid)",
                    )
                    for t, _ in fire
                ]
            first, rest = fire[0], fire[1:]
            out += [
                FireDecision(
                    name,
                    t.scheduled_for,
                    "skipped",
                    "overlap: fired together with an earlier tick (concurrency = forbid)",
                )
                for t, _ in rest
            ]
            fire = [first]
        elif job.concurrency == "replace":
            older, fire = fire[:-1], fire[-1:]
            out += [
                FireDecision(
                    name,
                    t.scheduled_for,
                    "skipped",
                    "overlap: replaced by a newer tick (concurrency = replace)",
                )
                for t, _ in older
            ]
        for tick, trigger in fire:
            out.append(
                FireDecision(
                    name,
                    tick.scheduled_for,
                    "fired",
                    None,
                    trigger,
                    self._request(scheduled, tick.scheduled_for, now),
                    replace_running=job.concurrency == "replace" and running,
                )
            )
        return out

    def _request(
        self, scheduled: ScheduledJob, scheduled_for: datetime, now: datetime
    ) -> RunRequest:
        job = scheduled.job
        run_at = None
        if job.jitter > 0:
            run_at = scheduled_for + timedelta(
                seconds=jitter_offset(scheduled.name, scheduled_for, job.jitter)
            )
            if run_at <= now:
                run_at = None
        return RunRequest(
            job_name=job.name,
            job_snapshot=scheduled.snapshot,
            backend=self.backend,
            app=job.app or self.app,
            region=job.region,
            max_attempts=job.retries.max_attempts,
            timeout_s=job.timeout,
            trigger="schedule",
            queue=QUEUE,
            run_at=run_at,
        )

    async def _prune(self) -> None:
        if self.clock.monotonic() - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = self.clock.monotonic()
        names, self._fired_since_prune = self._fired_since_prune, set()
        keep: dict[str, int] = {}
        for name in names:
            scheduled = self._schedules.get(name)
            if scheduled is not None and scheduled.job.history_limit is not None:
                keep[name] = scheduled.job.history_limit
        if not keep:
            return
        removed = await anyio.to_thread.run_sync(self.store.prune_schedules_runs, keep)
        for name, count in sorted(removed.items()):
            logger.info("pruned %d finished run(s) of schedule %s", count, name)


def _within(deadline: float | None, late: float) -> bool:
    return deadline is None or late <= deadline
