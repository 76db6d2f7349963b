"""The cron scheduler on an injected clock: every policy, downtime, DST, exactly-once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from jobrunner.clock import Clock
from jobrunner.scheduler import Scheduler
from jobrunner.spec import Job
from jobrunner.store import Store


class FakeClock(Clock):
    """Wall time that only moves when told (monotonic time moves with it)."""

    def __init__(self, start: datetime) -> None:
        self.at = start

    def time(self) -> float:
        return self.at.timestamp()

    def monotonic(self) -> float:
        return self.at.timestamp()

    def advance(self, **delta: float) -> None:
        self.at += timedelta(**delta)


START = datetime(2027, 1, 4, 9, 0, 0, tzinfo=UTC)  # a Monday


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def ledger(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path}/ledger.db", clock=clock)
    try:
        yield store
    finally:
        store.close()


def job(name: str = "tick", schedule: str = "* * * * *", **keys: Any) -> Job:
    return Job(name=name, image="alpine", cmd=["true"], schedule=schedule, **keys)


async def scheduler_for(store: Store, clock: FakeClock, *jobs: Job) -> Scheduler:
    scheduler = Scheduler(store, backend="local", app="jobrunner-local", jobs=jobs, clock=clock)
    await scheduler.load()
    return scheduler


def decisions(store: Store, name: str = "tick") -> list[tuple[str, str, str | None]]:
    """(scheduled_for HH:MM:SS, decision, reason word) oldest first."""
    fires = list(reversed(store.list_fires(name, limit=10_000)))
    return [
        (
            f.scheduled_for.strftime("%H:%M:%S"),
            f.decision,
            f.reason.split(":")[0] if f.reason else None,
        )
        for f in fires
    ]


async def run_for(scheduler: Scheduler, clock: FakeClock, seconds: int, step: float = 1) -> None:
    for _ in range(int(seconds / step)):
        clock.advance(seconds=step)
        await scheduler.step()


async def test_each_minute_fires_once_as_a_queued_run(ledger: Store, clock: FakeClock) -> None:
    scheduler = await scheduler_for(ledger, clock, job(concurrency="allow"))
    await run_for(scheduler, clock, 180)
    assert decisions(ledger) == [
        ("09:01:00", "fired", None),
        ("09:02:00", "fired", None),
        ("09:03:00", "fired", None),
    ]
    runs = ledger.list_runs(job="tick")
    assert len(runs) == 3 and {r.queue for r in runs} == {"default"}
    assert {r.trigger for r in runs} == {"schedule"}


async def test_a_new_schedule_does_not_fire_ticks_from_before_it_existed(
    ledger: Store, clock: FakeClock
) -> None:
    clock.advance(seconds=30)
    scheduler = await scheduler_for(ledger, clock, job())
    await scheduler.step()
    assert decisions(ledger) == []


async def test_two_schedulers_decide_each_tick_once(ledger: Store, clock: FakeClock) -> None:
    first = await scheduler_for(ledger, clock, job(schedule="* * * * * *", concurrency="allow"))
    second = await scheduler_for(ledger, clock, job(schedule="* * * * * *", concurrency="allow"))
    for _ in range(20):
        clock.advance(seconds=1)
        await first.step()
        await second.step()
    fired = [d for d in decisions(ledger) if d[1] == "fired"]
    assert len(fired) == 20 and len({d[0] for d in fired}) == 20
    assert len(ledger.list_runs(job="tick", limit=100)) == 20


async def test_paused_ticks_are_recorded_as_skipped(ledger: Store, clock: FakeClock) -> None:
    scheduler = await scheduler_for(ledger, clock, job())
    ledger.set_schedule_paused("tick", True)
    await run_for(scheduler, clock, 120)
    ledger.set_schedule_paused("tick", False)  # (nothing ran: forbid would not skip)
    await run_for(scheduler, clock, 60)
    assert [d[1:] for d in decisions(ledger)] == [
        ("skipped", "paused"),
        ("skipped", "paused"),
        ("fired", None),
    ]


async def test_paused_in_the_job_file(ledger: Store, clock: FakeClock) -> None:
    scheduler = await scheduler_for(ledger, clock, job(paused=True))
    await run_for(scheduler, clock, 60)
    assert decisions(ledger) == [("09:01:00", "skipped", "paused")]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("none", ["skipped"] * 10),
        ("latest", ["skipped"] * 9 + ["fired"]),
        ("all", ["skipped"] * 7 + ["fired"] * 3),
    ],
)
async def test_catch_up_after_downtime(
    ledger: Store, clock: FakeClock, policy: str, expected: list[str]
) -> None:
    keys: dict[str, Any] = {"catch_up": policy, "concurrency": "allow"}
    if policy == "all":
        keys["catch_up_limit"] = 3
    scheduler = await scheduler_for(ledger, clock, job(**keys))
    clock.advance(minutes=10, seconds=30)  # the scheduler was down for ten ticks
    fresh = await scheduler_for(ledger, clock, job(**keys))
    del scheduler
    await fresh.step()
    got = decisions(ledger)
    assert [d[1] for d in got] == expected
    assert all(d[2] == "catch_up" for d in got if d[1] == "skipped")
    if "fired" in expected:
        assert got[-1][0] == "09:10:00"  # the newest missed tick


async def test_starting_deadline_skips_a_late_tick(ledger: Store, clock: FakeClock) -> None:
    keys = {"catch_up": "all", "starting_deadline": "2m", "concurrency": "allow"}
    await scheduler_for(ledger, clock, job(**keys))
    clock.advance(minutes=5, seconds=30)
    late = await scheduler_for(ledger, clock, job(**keys))
    await late.step()
    assert [d[1:] for d in decisions(ledger)] == [
        ("skipped", "deadline"),
        ("skipped", "deadline"),
        ("skipped", "deadline"),
        ("fired", None),
        ("fired", None),
    ]


async def test_forbid_skips_while_the_previous_run_is_unfinished(
    ledger: Store, clock: FakeClock
) -> None:
    scheduler = await scheduler_for(ledger, clock, job(concurrency="forbid"))
    await run_for(scheduler, clock, 120)
    first = ledger.list_runs(job="tick")[-1]
    assert ledger.finish_run(first.id, "succeeded")
    await run_for(scheduler, clock, 60)
    assert [d[1:] for d in decisions(ledger)] == [
        ("fired", None),
        ("skipped", "overlap"),
        ("fired", None),
    ]


async def test_allow_starts_anyway(ledger: Store, clock: FakeClock) -> None:
    scheduler = await scheduler_for(ledger, clock, job(concurrency="allow"))
    await run_for(scheduler, clock, 120)
    assert [d[1] for d in decisions(ledger)] == ["fired", "fired"]


async def test_replace_cancels_the_running_one(ledger: Store, clock: FakeClock) -> None:
    scheduler = await scheduler_for(ledger, clock, job(concurrency="replace"))
    await run_for(scheduler, clock, 60)
    (first,) = ledger.list_runs(job="tick")
    await run_for(scheduler, clock, 60)
    assert [d[1] for d in decisions(ledger)] == ["fired", "fired"]
    assert ledger.get_run(first.id).cancel_requested


async def test_jitter_delays_each_run_the_same_way_every_time(
    ledger: Store, clock: FakeClock
) -> None:
    scheduler = await scheduler_for(ledger, clock, job(jitter="40s", concurrency="allow"))
    await run_for(scheduler, clock, 180)
    runs = sorted(ledger.list_runs(job="tick"), key=lambda r: r.created_at)
    offsets = [
        (r.next_attempt_at - r.created_at).total_seconds() for r in runs if r.next_attempt_at
    ]
    assert offsets and all(0 <= o < 40 for o in offsets)
    from jobrunner.cron import jitter_offset

    fires = [f for f in reversed(ledger.list_fires("tick")) if f.decision == "fired"]
    again = [jitter_offset("tick", f.scheduled_for, 40.0) for f in fires]
    assert again == [jitter_offset("tick", f.scheduled_for, 40.0) for f in fires]


async def test_manual_trigger_is_recorded_as_such(ledger: Store, clock: FakeClock) -> None:
    scheduler = await scheduler_for(ledger, clock, job())
    fire = await scheduler.trigger("tick")
    assert fire.trigger == "manual" and fire.decision == "fired" and fire.run_id
    assert ledger.get_run(fire.run_id).trigger == "schedule"


async def test_history_limit_prunes_old_finished_runs(ledger: Store, clock: FakeClock) -> None:
    scheduler = await scheduler_for(ledger, clock, job(history_limit=2, concurrency="allow"))
    for _ in range(5):
        await run_for(scheduler, clock, 60)
        for run in ledger.list_runs(job="tick", state="pending"):
            ledger.finish_run(run.id, "succeeded")
    clock.advance(seconds=120)  # past the pruning interval
    await scheduler.step()
    finished = ledger.list_runs(job="tick", state=["succeeded"], limit=100)
    assert len(finished) == 2
    assert len([d for d in decisions(ledger) if d[1] == "fired"]) >= 5  # decisions stay


@pytest.mark.parametrize(
    ("zone", "day", "fires", "gaps"),
    [
        ("Europe/Berlin", datetime(2027, 3, 28, tzinfo=UTC), 0, 1),  # spring forward
        ("Europe/Berlin", datetime(2027, 10, 31, tzinfo=UTC), 1, 0),  # fall back
        ("Australia/Sydney", datetime(2027, 10, 3, tzinfo=UTC), 0, 1),  # spring forward (south)
        ("Australia/Sydney", datetime(2027, 4, 4, tzinfo=UTC), 1, 0),  # fall back (south)
    ],
)
async def test_a_daily_0230_job_across_daylight_saving(
    tmp_path: Path, zone: str, day: datetime, fires: int, gaps: int
) -> None:
    from zoneinfo import ZoneInfo

    local_midnight = datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(zone))
    clock = FakeClock(local_midnight.astimezone(UTC))
    store = Store(f"sqlite:///{tmp_path}/dst.db", clock=clock)
    try:
        scheduler = await scheduler_for(
            store, clock, job("nightly", "30 2 * * *", timezone=zone, concurrency="allow")
        )
        await run_for(scheduler, clock, 6 * 3600, step=60)
        got = list(reversed(store.list_fires("nightly", limit=100)))
        assert sum(f.decision == "fired" for f in got) == fires
        gap_skips = [f for f in got if f.reason and f.reason.startswith("dst_gap")]
        assert len(gap_skips) == gaps
    finally:
        store.close()


async def test_job_file_changes_are_picked_up_without_a_restart(
    ledger: Store, clock: FakeClock, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    path = jobs / "tick.toml"
    path.write_text('image = "alpine"\ncmd = ["true"]\nschedule = "* * * * *"\n')
    scheduler = Scheduler(
        ledger, backend="local", app="jobrunner-local", jobs_dir=jobs, clock=clock
    )
    await scheduler.load()
    await run_for(scheduler, clock, 60)
    path.write_text('image = "alpine"\ncmd = ["true"]\nschedule = "*/2 * * * *"\npaused = true\n')
    await run_for(scheduler, clock, 240)
    assert [d[1:] for d in decisions(ledger)] == [
        ("fired", None),
        ("skipped", "paused"),
        ("skipped", "paused"),
    ]


# ---- decisions prepared ahead of the tick (Scheduler.prepare, used by Scheduler.run) ----------


async def run_preparing(scheduler: Scheduler, clock: FakeClock, seconds: int) -> None:
    """As ``run_for``, with ``prepare()`` before each step, as ``Scheduler.run`` does."""
    for _ in range(seconds):
        clock.advance(seconds=1)
        await scheduler.prepare()
        await scheduler.step()


async def test_prepared_ticks_are_recorded_at_the_tick_like_any_other(
    ledger: Store, clock: FakeClock
) -> None:
    scheduler = await scheduler_for(ledger, clock, job(concurrency="allow"))
    await run_preparing(scheduler, clock, 180)
    assert decisions(ledger) == [
        ("09:01:00", "fired", None),
        ("09:02:00", "fired", None),
        ("09:03:00", "fired", None),
    ]
    fires = ledger.list_fires("tick")
    runs = {r.id: r for r in ledger.list_runs(job="tick")}
    assert len(runs) == 3 and {f.run_id for f in fires} == set(runs)
    for fire in fires:
        run = runs[fire.run_id or ""]
        # Queued when the tick came, not when its row was built two seconds before.
        assert run.created_at >= fire.scheduled_for
        assert [t.to_state for t in ledger.transitions(run.id)] == ["pending"]
    assert ledger.schedule_states(["tick"])["tick"].decided_until == START + timedelta(minutes=3)


async def test_a_pause_between_preparing_and_the_tick_is_honoured(
    ledger: Store, clock: FakeClock
) -> None:
    scheduler = await scheduler_for(ledger, clock, job(concurrency="allow"))
    clock.advance(seconds=59)
    await scheduler.prepare()  # 09:00:59: the 09:01:00 tick is worked out
    ledger.set_schedule_paused("tick", True)
    await run_preparing(scheduler, clock, 1)
    assert decisions(ledger) == [("09:01:00", "skipped", "paused")]
    assert ledger.list_runs(job="tick") == []


async def test_a_job_file_edited_after_preparing_fires_the_new_version(
    ledger: Store, clock: FakeClock, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    path = jobs / "tick.toml"
    path.write_text('image = "alpine"\ncmd = ["old"]\nschedule = "* * * * *"\n')
    scheduler = Scheduler(
        ledger, backend="local", app="jobrunner-local", jobs_dir=jobs, clock=clock
    )
    await scheduler.load()
    clock.advance(seconds=58)
    await scheduler.prepare()  # built with cmd = ["old"]
    path.write_text('image = "alpine"\ncmd = ["new"]\nschedule = "* * * * *"\n')
    await run_preparing(scheduler, clock, 2)  # 09:00:59 re-reads the folder, 09:01:00 fires
    (run,) = ledger.list_runs(job="tick")
    assert run.job_snapshot["cmd"] == ["new"]


async def test_forbid_is_decided_at_the_tick_even_when_prepared(
    ledger: Store, clock: FakeClock
) -> None:
    scheduler = await scheduler_for(ledger, clock, job(concurrency="forbid"))
    await run_preparing(scheduler, clock, 60)
    (first,) = ledger.list_runs(job="tick")
    clock.advance(seconds=59)
    await scheduler.prepare()  # 09:01:59, while the first run is still unfinished
    assert ledger.finish_run(first.id, "succeeded")
    await run_preparing(scheduler, clock, 1)
    assert [d[1] for d in decisions(ledger)] == ["fired", "fired"]


async def test_a_minute_is_prepared_once_however_often_the_loop_wakes(
    ledger: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared: list[int] = []
    real = ledger.prepare_fires

    def counted(decisions: list[Any]) -> Any:
        prepared.append(len(decisions))
        return real(decisions)

    monkeypatch.setattr(ledger, "prepare_fires", counted)
    scheduler = await scheduler_for(ledger, clock, job(concurrency="allow"))
    await run_preparing(scheduler, clock, 120)
    assert prepared == [1, 1]  # one preparation per tick, not one per wake before it
    assert [d[1] for d in decisions(ledger)] == ["fired", "fired"]
