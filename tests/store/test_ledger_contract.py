"""The Ledger contract: one suite, run against every implementation.

Each test runs on ``memory`` (:class:`jobrunner.testing.MemoryLedger`), ``sqlite`` (a
:class:`SqlLedger` over a SQLite file) and ``postgres`` (a :class:`SqlLedger` over a fresh
PostgreSQL database, the same isolation as the ``database_url`` fixture; skipped when the server
does not answer, a failure with ``JOBRUNNER_REQUIRE_POSTGRES=1``).

Time: memory and SQLite take every timestamp, claim expiries included, from a frozen fake clock
that ``pass_time`` moves. PostgreSQL stamps claims with the server's clock, so there the fake
clock follows real time and ``pass_time`` really sleeps (the tests keep those waits short).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

import jobrunner.testing as testing_module
from jobrunner.clock import Clock
from jobrunner.store import (
    AmbiguousRunId,
    AttemptNotFound,
    InvalidRunId,
    Ledger,
    LogLineIn,
    Run,
    RunNotFound,
    RunRequest,
    SqlLedger,
    Store,
    StoreIntegrityError,
)
from jobrunner.store import store as store_module
from jobrunner.store.store import DEFAULT_IDEMPOTENCY_WINDOW
from jobrunner.testing import MemoryLedger
from tests.conftest import _require_postgres, fresh_postgres_database

SNAPSHOT = {"name": "hello", "image": "python:3.12-slim", "cmd": ["true"]}


class FakeClock(Clock):
    """Frozen time that tests move with ``advance`` or, with ``follow_real_time``, real time
    plus whatever ``advance`` added."""

    def __init__(self, *, follow_real_time: bool = False) -> None:
        self.follow_real_time = follow_real_time
        self.offset = 0.0
        self.frozen = time.time()

    def time(self) -> float:
        return (time.time() if self.follow_real_time else self.frozen) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclasses.dataclass
class Harness:
    """One ledger under test, its clock, and a way to open a second ledger on the same data."""

    kind: str
    clock: FakeClock
    ledger: Ledger
    open_other: Callable[[], Ledger]

    def other(self) -> Ledger:
        """Another ledger on the same database (its own Store and connections: another
        process, as far as the database can tell). For memory, the same ledger."""
        return self.open_other()

    async def pass_time(self, seconds: float) -> None:
        """Let ``seconds`` go by for timestamps, claim expiries and due times."""
        if self.clock.follow_real_time:
            await anyio.sleep(seconds)
        else:
            self.clock.advance(seconds)

    def now(self) -> datetime:
        return self.clock.now()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    kind: str = request.param
    with ExitStack() as stack:
        if kind == "memory":
            clock = FakeClock()
            memory = MemoryLedger(clock)
            yield Harness(kind, clock, memory, lambda: memory)
            return
        if kind == "sqlite":
            url = f"sqlite:///{tmp_path / 'ledger.db'}"
            clock = FakeClock()
        else:
            _require_postgres()
            url = stack.enter_context(fresh_postgres_database())
            clock = FakeClock(follow_real_time=True)

        def open_ledger() -> Ledger:
            store = Store(url, clock=clock)
            stack.callback(store.close)
            return SqlLedger(store)

        ledger = open_ledger()
        yield Harness(kind, clock, ledger, open_ledger)


def req(**overrides: Any) -> RunRequest:
    values: dict[str, Any] = {
        "job_name": "hello",
        "job_snapshot": SNAPSHOT,
        "backend": "local",
        "app": "jobrunner-local",
        "region": None,
        "max_attempts": 1,
        "timeout_s": None,
        "queue": "default",
    }
    values.update(overrides)
    return RunRequest(**values)


async def enqueue(ledger: Ledger, **overrides: Any) -> Run:
    [(run, created)] = await ledger.enqueue_runs([req(**overrides)])
    assert created
    return run


async def create(ledger: Ledger, **overrides: Any) -> Run:
    values: dict[str, Any] = {
        "job_name": "hello",
        "job_snapshot": SNAPSHOT,
        "backend": "local",
        "app": "jobrunner-local",
        "region": None,
        "max_attempts": 1,
        "timeout_s": None,
    }
    values.update(overrides)
    return await ledger.create_run(**values)


async def claim(
    ledger: Ledger, owner: str = "w1", *, queues: tuple[str, ...] = ("default",), **kw: Any
) -> list[str]:
    kw.setdefault("backend", "local")
    kw.setdefault("limit", 10)
    kw.setdefault("ttl_s", 30)
    return [run.id for run in await ledger.claim_due(owner, queues=list(queues), **kw)]


def steps(transitions: list[Any]) -> list[tuple[str | None, str]]:
    return [(t.from_state, t.to_state) for t in transitions]


# ----- runs -----


async def test_create_and_get_a_run(h: Harness) -> None:
    run = await create(h.ledger, max_attempts=3, timeout_s=90.0, trigger="python")

    fetched = await h.ledger.get_run(run.id)
    assert fetched == run
    assert (fetched.state, fetched.attempts, fetched.max_attempts) == ("pending", 0, 3)
    assert (fetched.trigger, fetched.timeout_s, fetched.queue, fetched.priority) == (
        "python",
        90.0,
        None,
        0,
    )
    assert fetched.owner is None and fetched.owner_expires_at is None
    assert fetched.created_at.utcoffset() == timedelta(0)
    assert abs(fetched.created_at - h.now()) < timedelta(seconds=30)
    assert len(run.id) == 26
    [first] = await h.ledger.transitions(run.id)
    assert (first.from_state, first.to_state, first.reason) == (None, "pending", "submitted")


async def test_records_are_frozen_snapshots(h: Harness) -> None:
    run = await create(h.ledger)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.state = "running"  # type: ignore[misc]
    fetched = await h.ledger.get_run(run.id)
    fetched.job_snapshot["image"] = "changed"
    assert (await h.ledger.get_run(run.id)).job_snapshot == SNAPSHOT


async def test_create_run_born_claimed(h: Harness) -> None:
    run = await create(h.ledger, owner="w1", owner_ttl_s=60)
    assert run.owner == "w1"
    assert run.owner_expires_at is not None
    assert timedelta(seconds=50) < run.owner_expires_at - h.now() <= timedelta(seconds=61)
    assert not await h.other().claim_run(run.id, "w2", 30)

    # A process whose clock lags (PostgreSQL stamps claims with the server's time) still makes
    # a born claim that holds.
    h.clock.advance(-3600)
    lagging = await create(h.ledger, owner="w1", owner_ttl_s=60)
    assert not await h.other().claim_run(lagging.id, "w2", 30)
    assert (
        await h.ledger.claim_orphans("w2", backend="local", limit=5, ttl_s=30, dead_owners=[]) == []
    )


async def test_create_run_rejects_bad_values(h: Harness) -> None:
    with pytest.raises(ValueError, match="backend"):
        await create(h.ledger, backend="kubernetes")
    with pytest.raises(ValueError, match="max_attempts"):
        await create(h.ledger, max_attempts=0)
    assert await h.ledger.list_runs() == []


async def test_get_run_by_prefix_and_its_errors(h: Harness) -> None:
    run = await create(h.ledger)
    assert (await h.ledger.get_run(run.id[:6].lower())).id == run.id
    assert (await h.ledger.get_run(run.id[:12])).id == run.id

    with pytest.raises(InvalidRunId, match="at least 6"):
        await h.ledger.get_run(run.id[:5])
    with pytest.raises(RunNotFound):
        await h.ledger.get_run("not-an-id!")
    with pytest.raises(RunNotFound, match="jobrunner runs list"):
        await h.ledger.get_run("01ZZZZZZZZZZZZZZZZZZZZZZZZ")
    with pytest.raises(RunNotFound):
        await h.ledger.get_run(run.id + "0")


async def test_an_ambiguous_prefix_names_the_matches(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = iter([f"01HX00000000000000000000{n:02d}" for n in range(1, 9)])
    monkeypatch.setattr(store_module, "new_run_id", lambda: next(ids))
    monkeypatch.setattr(testing_module, "new_run_id", lambda: next(ids))
    made = [await create(h.ledger) for _ in range(8)]

    with pytest.raises(AmbiguousRunId) as caught:
        await h.ledger.get_run("01hx0000")
    assert caught.value.matches == [run.id for run in made[:6]]  # the first six, in id order
    assert made[1].id in str(caught.value)
    assert (await h.ledger.get_run(made[1].id)).id == made[1].id


async def test_list_runs_newest_first_with_filters(h: Harness) -> None:
    old = await create(h.ledger, job_name="hello")
    await h.pass_time(0.01)
    report = await create(h.ledger, job_name="report")
    await h.pass_time(0.01)
    new = await create(h.ledger, job_name="hello")
    assert await h.ledger.finish_run(new.id, "failed", exit_code=3)

    assert [r.id for r in await h.ledger.list_runs()] == [new.id, report.id, old.id]
    assert [r.id for r in await h.ledger.list_runs(job="hello")] == [new.id, old.id]
    assert [r.id for r in await h.ledger.list_runs(state="failed")] == [new.id]
    assert [r.id for r in await h.ledger.list_runs(state=["pending"], limit=1)] == [report.id]
    with pytest.raises(ValueError, match="unknown run state"):
        await h.ledger.list_runs(state="sleeping")
    assert [r.id for r in await h.ledger.list_unfinished_runs()] == [old.id, report.id]
    assert [r.id for r in await h.ledger.list_unfinished_runs(limit=1)] == [old.id]


async def test_transitions_are_recorded_and_refused_from_wrong_states(h: Harness) -> None:
    run = await create(h.ledger)
    assert await h.ledger.transition_run(run.id, "creating", reason="go", attempt_number=1)
    assert not await h.ledger.transition_run(run.id, "running", from_states={"pending"})
    assert await h.ledger.transition_run(run.id, "running", attempt_number=1, region="ams")
    running = await h.ledger.get_run(run.id)
    assert running.state == "running" and running.region == "ams"
    assert running.started_at is not None

    assert await h.ledger.finish_run(run.id, "failed", exit_code=2, reason="exit 2")
    done = await h.ledger.get_run(run.id)
    assert (done.state, done.exit_code, done.reason) == ("failed", 2, "exit 2")
    assert done.finished_at is not None and done.next_attempt_at is None
    assert done.is_finished
    # A recorded outcome is never overwritten by accident.
    assert not await h.ledger.transition_run(run.id, "running")
    assert not await h.ledger.finish_run(run.id, "succeeded")

    history = await h.ledger.transitions(run.id)
    assert steps(history) == [
        (None, "pending"),
        ("pending", "creating"),
        ("creating", "running"),
        ("running", "failed"),
    ]
    assert [t.attempt_number for t in history] == [None, 1, 1, None]
    assert [t.reason for t in history][1:] == ["go", None, "exit 2"]
    assert [t.id for t in history] == sorted(t.id for t in history)
    assert (await h.ledger.get_run(run.id)) == done


async def test_transition_errors(h: Harness) -> None:
    run = await create(h.ledger)
    with pytest.raises(ValueError, match="unknown run state"):
        await h.ledger.transition_run(run.id, "sleeping")
    with pytest.raises(ValueError, match="cannot set"):
        await h.ledger.transition_run(run.id, "running", owner="me")
    with pytest.raises(ValueError, match="timezone-aware"):
        await h.ledger.transition_run(run.id, "pending", next_attempt_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="outcome"):
        await h.ledger.finish_run(run.id, "running")
    with pytest.raises(RunNotFound):
        await h.ledger.transition_run("01ZZZZZZZZZZZZZZZZZZZZZZZZ", "running")
    with pytest.raises(RunNotFound):
        await h.ledger.finish_run("01ZZZZZZZZZZZZZZZZZZZZZZZZ", "failed")
    assert steps(await h.ledger.transitions(run.id)) == [(None, "pending")]


async def test_finish_exactly_once_under_concurrency(h: Harness) -> None:
    results: dict[str, bool] = {}

    async def finish(ledger: Ledger, run_id: str, outcome: str) -> None:
        results[outcome] = await ledger.finish_run(run_id, outcome)

    for _ in range(3):
        run = await create(h.ledger)
        results.clear()

        async with anyio.create_task_group() as tg:
            tg.start_soon(finish, h.ledger, run.id, "succeeded")
            tg.start_soon(finish, h.other(), run.id, "cancelled")

        assert sorted(results.values()) == [False, True], results
        winner = next(outcome for outcome, won in results.items() if won)
        assert (await h.ledger.get_run(run.id)).state == winner
        assert steps(await h.ledger.transitions(run.id)) == [(None, "pending"), ("pending", winner)]


async def test_request_cancel_and_cancel_requests(h: Harness) -> None:
    mine = await create(h.ledger, owner="w1")
    theirs = await create(h.ledger, owner="w2")
    quiet = await create(h.ledger, owner="w1")
    assert await h.ledger.request_cancel(mine.id)
    assert await h.ledger.request_cancel(theirs.id)
    assert (await h.ledger.get_run(mine.id)).cancel_requested
    assert not (await h.ledger.get_run(quiet.id)).cancel_requested

    assert await h.ledger.cancel_requests("w1") == {mine.id}
    assert await h.ledger.finish_run(mine.id, "cancelled")
    assert await h.ledger.cancel_requests("w1") == set()
    assert not await h.ledger.request_cancel(mine.id), "already finished"
    with pytest.raises(RunNotFound):
        await h.ledger.request_cancel("01ZZZZZZZZZZZZZZZZZZZZZZZZ")


# ----- attempts -----


async def test_attempts_are_numbered_once(h: Harness) -> None:
    run = await create(h.ledger, max_attempts=3)
    first = await h.ledger.create_attempt(run.id, 1, submit_id=f"{run.id}.1", region="ams")
    assert (first.number, first.state, first.region, first.machine_id) == (
        1,
        "creating",
        "ams",
        None,
    )
    assert (await h.ledger.get_run(run.id)).attempts == 1

    with pytest.raises(StoreIntegrityError, match="already has attempt 1"):
        await h.ledger.create_attempt(run.id, 1, submit_id=f"{run.id}.1b", region=None)
    with pytest.raises(StoreIntegrityError):
        await h.ledger.create_attempt(run.id, 2, submit_id=f"{run.id}.1", region=None)
    with pytest.raises(RunNotFound):
        await h.ledger.create_attempt("01ZZZZZZZZZZZZZZZZZZZZZZZZ", 1, submit_id="x", region=None)

    second = await h.ledger.create_attempt(run.id, 2, submit_id=f"{run.id}.2", region=None)
    assert second.id != first.id
    updated = await h.ledger.update_attempt(run.id, 1, machine_id="m1", state="started")
    assert (updated.machine_id, updated.state, updated.id) == ("m1", "started", first.id)
    await h.ledger.update_attempt(run.id, 2, machine_id="m2", outcome="failed", exit_code=1)

    assert [a.number for a in await h.ledger.get_attempts(run.id)] == [1, 2]
    latest = await h.ledger.latest_attempt(run.id)
    assert latest is not None and (latest.number, latest.outcome, latest.exit_code) == (
        2,
        "failed",
        1,
    )
    assert (await h.ledger.get_run(run.id)).attempts == 2
    assert await h.ledger.machine_ids_of_live_runs() == {"m1", "m2"}

    with pytest.raises(AttemptNotFound):
        await h.ledger.update_attempt(run.id, 9, state="started")
    with pytest.raises(ValueError, match="outcome"):
        await h.ledger.update_attempt(run.id, 1, outcome="dead")
    with pytest.raises(ValueError, match="cannot set"):
        await h.ledger.update_attempt(run.id, 1, submit_id="other")

    assert await h.ledger.finish_run(run.id, "failed")
    assert await h.ledger.machine_ids_of_live_runs() == set()
    other = await create(h.ledger)
    assert await h.ledger.get_attempts(other.id) == []
    assert await h.ledger.latest_attempt(other.id) is None


# ----- enqueue and idempotency -----


async def test_enqueue_returns_each_run_and_whether_it_was_created(h: Harness) -> None:
    out = await h.ledger.enqueue_runs(
        [req(priority=5, idempotency_key="a"), req(queue="other"), req(idempotency_key="a")]
    )
    (first, c1), (second, c2), (again, c3) = out
    assert (c1, c2, c3) == (True, True, False)
    assert again == first, "the same key in one batch names the same run"
    assert (first.queue, first.priority, first.trigger, first.idempotency_key) == (
        "default",
        5,
        "queue",
        "a",
    )
    assert second.queue == "other"
    assert await h.ledger.get_run(first.id) == first
    [entry] = await h.ledger.transitions(first.id)
    assert (entry.to_state, entry.reason) == ("pending", "enqueued on default")
    assert len(await h.ledger.list_runs()) == 2


async def test_an_enqueue_batch_is_all_or_nothing(h: Harness) -> None:
    with pytest.raises(ValueError, match="backend"):
        await h.ledger.enqueue_runs([req(), req(backend="kubernetes")])
    with pytest.raises(ValueError, match="timezone-aware"):
        await h.ledger.enqueue_runs([req(), req(run_at=datetime(2030, 1, 1))])
    assert await h.ledger.list_runs() == []


async def test_idempotency_key_and_window(h: Harness) -> None:
    window = timedelta(minutes=10)
    [(run, created)] = await h.ledger.enqueue_runs(
        [req(idempotency_key="k")], idempotency_window=window
    )
    assert created

    [(same, created)] = await h.ledger.enqueue_runs(
        [req(idempotency_key="k")], idempotency_window=window
    )
    assert (same.id, created) == (run.id, False), "unfinished: the same run"

    assert await h.ledger.finish_run(run.id, "succeeded", exit_code=0)
    h.clock.advance(9 * 60)
    [(same, created)] = await h.ledger.enqueue_runs(
        [req(idempotency_key="k")], idempotency_window=window
    )
    assert (same.id, same.state, created) == (run.id, "succeeded", False), "within the window"

    h.clock.advance(2 * 60)
    [(fresh, created)] = await h.ledger.enqueue_runs(
        [req(idempotency_key="k")], idempotency_window=window
    )
    assert created and fresh.id != run.id, "after the window: a new run"
    [(again, created)] = await h.ledger.enqueue_runs([req(idempotency_key="k")])
    assert (again.id, created) == (fresh.id, False), "the newest run of the key answers"
    [(other, created)] = await h.ledger.enqueue_runs([req(idempotency_key="k2")])
    assert created and other.id not in {run.id, fresh.id}


# ----- claiming due runs -----


async def test_claim_due_by_priority_then_due_time(h: Harness) -> None:
    now = h.now()
    low = await enqueue(h.ledger, priority=0)
    late = await enqueue(h.ledger, priority=5, run_at=now - timedelta(seconds=5))
    early = await enqueue(h.ledger, priority=5, run_at=now - timedelta(seconds=50))
    urgent = await enqueue(h.ledger, priority=9)
    future = await enqueue(h.ledger, priority=99, run_at=now + timedelta(seconds=0.5))

    order = [await claim(h.ledger, limit=1) for _ in range(4)]
    assert order == [[urgent.id], [early.id], [late.id], [low.id]]
    assert await claim(h.ledger) == [], "a run whose run_at is ahead is not due yet"

    await h.pass_time(0.7)
    [claimed] = await h.ledger.claim_due(
        "w1", backend="local", queues=["default"], limit=10, ttl_s=30
    )
    assert claimed.id == future.id
    assert (claimed.owner, claimed.state) == ("w1", "pending")
    assert claimed.owner_expires_at is not None and claimed.owner_expires_at > h.now()
    assert await h.ledger.get_run(future.id) == claimed


async def test_claim_due_returns_runs_in_claim_order(h: Harness) -> None:
    runs = [await enqueue(h.ledger, priority=p) for p in (1, 3, 2)]
    assert await claim(h.ledger) == [runs[1].id, runs[2].id, runs[0].id]


async def test_claim_due_filters_queues_and_backend_and_limits(h: Harness) -> None:
    a = [await enqueue(h.ledger, queue="a") for _ in range(3)]
    b = await enqueue(h.ledger, queue="b")
    fly = await enqueue(h.ledger, queue="a", backend="fly")
    unqueued = await create(h.ledger)

    assert await claim(h.ledger, queues=("a",), limit=2) == [a[0].id, a[1].id]
    assert await claim(h.ledger, queues=("a",), limit=0) == []
    assert await claim(h.ledger, queues=()) == []
    assert await claim(h.ledger, queues=("a",)) == [a[2].id]
    assert await claim(h.ledger, queues=("a", "b")) == [b.id]
    assert await claim(h.ledger, queues=("a",), backend="fly") == [fly.id]
    assert await claim(h.ledger, queues=("a", "b", "default")) == []
    assert (await h.ledger.get_run(unqueued.id)).owner is None


async def test_queue_limits_hold_across_owners(h: Harness) -> None:
    slow = [await enqueue(h.ledger, queue="slow") for _ in range(4)]
    limits = {"slow": 2}
    first = await claim(h.ledger, "w1", queues=("slow",), queue_limits=limits)
    assert first == [slow[0].id, slow[1].id]
    other = h.other()
    assert await claim(other, "w2", queues=("slow",), queue_limits=limits) == []

    assert await h.ledger.finish_run(slow[0].id, "succeeded")
    assert await claim(other, "w2", queues=("slow",), queue_limits=limits) == [slow[2].id]
    assert await claim(h.ledger, "w1", queues=("slow",), queue_limits=limits) == []
    assert await claim(h.ledger, "w1", queues=("slow",)) == [slow[3].id], "no limit given"


async def test_queue_limits_do_not_break_the_priority_order(h: Harness) -> None:
    fast = [await enqueue(h.ledger, queue="fast", priority=1) for _ in range(2)]
    slow = [await enqueue(h.ledger, queue="slow", priority=9) for _ in range(3)]
    limits = {"slow": 2}

    # slow's runs come first (priority), but only two of them; then fast's.
    claimed = await claim(h.ledger, queues=("fast", "slow"), limit=3, queue_limits=limits)
    assert claimed == [slow[0].id, slow[1].id, fast[0].id]
    claimed = await claim(h.ledger, queues=("slow", "fast"), limit=3, queue_limits=limits)
    assert claimed == [fast[1].id]


async def test_concurrent_claimers_never_share_a_run(h: Harness) -> None:
    made = await h.ledger.enqueue_runs([req(priority=n % 3) for n in range(24)])
    ledgers = [h.ledger, h.other(), h.other()]
    got: dict[str, list[str]] = {f"w{n}": [] for n in range(len(ledgers))}

    async def worker(ledger: Ledger, owner: str) -> None:
        while True:
            batch = await claim(ledger, owner, limit=3)
            if not batch:
                return
            got[owner] += batch

    async with anyio.create_task_group() as tg:
        for n, ledger in enumerate(ledgers):
            tg.start_soon(worker, ledger, f"w{n}")

    everything = [run_id for batch in got.values() for run_id in batch]
    assert len(everything) == len(set(everything)) == 24
    assert set(everything) == {run.id for run, _ in made}
    for owner, ids in got.items():
        for run_id in ids:
            assert (await h.ledger.get_run(run_id)).owner == owner


async def test_concurrent_claimers_respect_queue_limits(h: Harness) -> None:
    await h.ledger.enqueue_runs([req(queue=q) for q in ("a", "b") * 6])
    ledgers = [h.ledger, h.other(), h.other()]
    limits = {"a": 2, "b": 3}
    got: list[str] = []

    async def worker(ledger: Ledger, owner: str, queues: tuple[str, ...]) -> None:
        for _ in range(4):
            got.extend(await claim(ledger, owner, queues=queues, queue_limits=limits))

    async with anyio.create_task_group() as tg:
        for n, ledger in enumerate(ledgers):
            # Queues named in different orders: claimers must not deadlock on each other.
            tg.start_soon(worker, ledger, f"w{n}", ("a", "b") if n % 2 else ("b", "a"))

    assert len(got) == len(set(got)) == 5
    stats = await h.ledger.queue_stats()
    assert [(s["queue"], s["pending"], s["in_flight"]) for s in stats] == [("a", 4, 2), ("b", 3, 3)]


async def test_concurrent_enqueues_of_the_same_keys_make_one_run_each(h: Harness) -> None:
    keys = [f"key-{n}" for n in range(6)]
    results: list[list[tuple[Run, bool]]] = []

    async def enqueuer(ledger: Ledger, order: list[str]) -> None:
        out = await ledger.enqueue_runs([req(idempotency_key=k) for k in order])
        results.append(sorted(out, key=lambda pair: str(pair[0].idempotency_key)))

    for _ in range(3):
        results.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(enqueuer, h.ledger, keys)
            tg.start_soon(enqueuer, h.other(), keys[::-1])
        first, second = results
        assert [run.id for run, _ in first] == [run.id for run, _ in second]
        created = [c for _, c in first] + [c for _, c in second]
        assert created.count(True) == len(keys)
        for run, _ in first:
            assert await h.ledger.finish_run(run.id, "succeeded")
        h.clock.advance(DEFAULT_IDEMPOTENCY_WINDOW.total_seconds() + 1)

    assert len(await h.ledger.list_runs(limit=None)) == 3 * len(keys)


# ----- holding claims -----


async def test_claim_run_and_takeover(h: Harness) -> None:
    run = await create(h.ledger)
    assert await h.ledger.claim_run(run.id, "w1", 30)
    assert await h.ledger.claim_run(run.id, "w1", 30), "the owner may claim again"
    assert not await h.ledger.claim_run(run.id, "w2", 30)
    assert not await h.ledger.takeover_claim(run.id, "someone", "w2", 30)
    assert await h.ledger.takeover_claim(run.id, "w1", "w2", 30)
    assert (await h.ledger.get_run(run.id)).owner == "w2"

    await h.ledger.release_claim(run.id, "w1")
    assert (await h.ledger.get_run(run.id)).owner == "w2", "only the owner releases"
    await h.ledger.release_claim(run.id, "w2")
    released = await h.ledger.get_run(run.id)
    assert released.owner is None and released.owner_expires_at is None
    assert await h.ledger.takeover_claim(run.id, None, "w3", 30)

    assert await h.ledger.finish_run(run.id, "succeeded")
    assert not await h.ledger.claim_run(run.id, "w3", 30)
    assert not await h.ledger.claim_run("01ZZZZZZZZZZZZZZZZZZZZZZZZ", "w3", 30)


async def test_renew_claims_returns_the_runs_still_held(h: Harness) -> None:
    kept = await create(h.ledger, owner="w1", owner_ttl_s=0.2)
    lost = await create(h.ledger, owner="w1", owner_ttl_s=0.2)
    done = await create(h.ledger, owner="w1", owner_ttl_s=60)
    await create(h.ledger, owner="w2", owner_ttl_s=60)
    assert await h.ledger.finish_run(done.id, "succeeded")
    await h.pass_time(0.4)

    assert await h.other().claim_run(lost.id, "w2", 30), "an expired claim can be taken"
    # A finished run its driver has not let go of yet is still held: a driver that finishes a
    # run while a renewal runs must not be told it lost it.
    assert await h.ledger.renew_claims("w1", 60) == {kept.id, done.id}
    renewed = await h.ledger.get_run(kept.id)
    assert renewed.owner_expires_at is not None
    assert renewed.owner_expires_at - h.now() > timedelta(seconds=50)
    assert await h.ledger.renew_claims("nobody", 60) == set()
    assert await h.ledger.claim_owners("local") == {"w1", "w2"}
    assert await h.ledger.claim_owners("fly") == set()


async def test_requeue_run_releases_the_claim_until_the_next_attempt(h: Harness) -> None:
    run = await enqueue(h.ledger, max_attempts=2)
    assert await claim(h.ledger, "w1") == [run.id]
    assert await h.ledger.transition_run(run.id, "creating", attempt_number=1)
    await h.ledger.create_attempt(run.id, 1, submit_id=f"{run.id}.1", region=None)
    assert await h.ledger.transition_run(run.id, "running", attempt_number=1)

    retry_at = h.now() + timedelta(seconds=0.5)
    assert not await h.ledger.requeue_run(
        run.id, "w2", next_attempt_at=retry_at, reason="exit 1", attempt_number=1
    ), "only the owner requeues"
    assert await h.ledger.requeue_run(
        run.id, "w1", next_attempt_at=retry_at, reason="exit 1", attempt_number=1
    )
    waiting = await h.ledger.get_run(run.id)
    assert (waiting.state, waiting.owner, waiting.owner_expires_at) == ("pending", None, None)
    assert waiting.next_attempt_at == retry_at
    last = (await h.ledger.transitions(run.id))[-1]
    assert (last.from_state, last.to_state, last.reason, last.attempt_number) == (
        "running",
        "pending",
        "exit 1",
        1,
    )
    assert await claim(h.ledger, "w2") == [], "not before next_attempt_at"
    assert (
        await h.ledger.claim_orphans("w2", backend="local", limit=5, ttl_s=30, dead_owners=[]) == []
    )

    await h.pass_time(0.7)
    assert await claim(h.ledger, "w2") == [run.id]
    assert await h.ledger.finish_run(run.id, "failed")
    assert not await h.ledger.requeue_run(
        run.id, "w2", next_attempt_at=retry_at, reason="again", attempt_number=2
    ), "a finished run stays finished"
    with pytest.raises(ValueError, match="timezone-aware"):
        await h.ledger.requeue_run(
            run.id, "w2", next_attempt_at=datetime(2030, 1, 1), reason="x", attempt_number=2
        )


async def test_claim_orphans_adopts_runs_nobody_drives(h: Harness) -> None:
    dead_owner = await create(h.ledger, owner="dead:1", owner_ttl_s=60)
    expired = await create(h.ledger, owner="gone:2", owner_ttl_s=0.2)
    unowned = await create(h.ledger)
    queued = await enqueue(h.ledger)  # waits for claim_due: not an orphan
    alive = await create(h.ledger, owner="alive:3", owner_ttl_s=60)
    started = await enqueue(h.ledger)  # a queued run its driver started, then released
    assert await h.ledger.claim_run(started.id, "w9", 60)
    assert await h.ledger.transition_run(started.id, "creating")
    await h.ledger.release_claim(started.id, "w9")
    fly = await create(h.ledger, backend="fly")
    finished = await create(h.ledger)
    assert await h.ledger.finish_run(finished.id, "succeeded")
    later = await create(h.ledger)
    future = h.now() + timedelta(seconds=60)
    assert await h.ledger.transition_run(later.id, "pending", next_attempt_at=future)
    await h.pass_time(0.4)

    assert await h.ledger.claim_owners("local") == {"dead:1", "gone:2", "alive:3"}
    adopt = h.ledger.claim_orphans
    first = await adopt("w1", backend="local", limit=2, ttl_s=30, dead_owners=["dead:1"])
    assert [r.id for r in first] == [dead_owner.id, expired.id], "oldest first, at most limit"
    assert all(r.owner == "w1" for r in first)
    rest = await adopt("w1", backend="local", limit=10, ttl_s=30, dead_owners=["dead:1"])
    assert [r.id for r in rest] == [unowned.id, started.id]
    assert await adopt("w2", backend="local", limit=10, ttl_s=30, dead_owners=[]) == []
    assert (await h.ledger.get_run(queued.id)).owner is None
    assert (await h.ledger.get_run(alive.id)).owner == "alive:3"
    assert [r.id for r in await adopt("w1", backend="fly", limit=5, ttl_s=30, dead_owners=[])] == [
        fly.id
    ]
    assert await adopt("w1", backend="local", limit=0, ttl_s=30, dead_owners=[]) == []


async def test_retry_a_dead_run(h: Harness) -> None:
    run = await enqueue(h.ledger, queue="q", max_attempts=1, priority=4)
    assert await claim(h.ledger, queues=("q",)) == [run.id]
    await h.ledger.create_attempt(run.id, 1, submit_id=f"{run.id}.1", region=None)
    assert await h.ledger.request_cancel(run.id)
    assert await h.ledger.finish_run(run.id, "dead", exit_code=1, reason="out of attempts")

    with pytest.raises(ValueError, match="at least 1"):
        await h.ledger.retry_run(run.id, extra_attempts=0)
    retried = await h.ledger.retry_run(run.id, extra_attempts=2)
    assert (retried.id, retried.state, retried.attempts, retried.max_attempts) == (
        run.id,
        "pending",
        1,
        3,
    )
    assert (retried.queue, retried.priority, retried.owner, retried.cancel_requested) == (
        "q",
        4,
        None,
        False,
    )
    assert (retried.exit_code, retried.reason, retried.finished_at) == (None, None, None)
    assert await h.ledger.get_run(run.id) == retried
    last = (await h.ledger.transitions(run.id))[-1]
    assert (last.from_state, last.to_state, last.reason) == (
        "dead",
        "pending",
        "retried by the user",
    )
    assert await claim(h.ledger, "w2", queues=("q",)) == [run.id]

    with pytest.raises(ValueError, match="only a finished run"):
        await h.ledger.retry_run(run.id, extra_attempts=1)
    with pytest.raises(RunNotFound):
        await h.ledger.retry_run("01ZZZZZZZZZZZZZZZZZZZZZZZZ", extra_attempts=1)

    plain = await create(h.ledger)
    assert await h.ledger.finish_run(plain.id, "failed")
    assert (await h.ledger.retry_run(plain.id, extra_attempts=1)).queue == "default"


# ----- logs -----


async def test_add_logs_dedupes_and_get_logs_keeps_order(h: Harness) -> None:
    run = await create(h.ledger)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    lines = [
        LogLineIn(ts=t0, message="one", entry_id="e1"),
        LogLineIn(ts=t0, message="two"),
        LogLineIn(ts=t0 + timedelta(seconds=1), message="three", stream="stderr"),
        LogLineIn(ts=t0, message="one again, same id", entry_id="e1"),
        LogLineIn(ts=t0, message="two"),
    ]
    assert await h.ledger.add_logs(run.id, 1, lines) == 3
    assert await h.ledger.add_logs(run.id, 1, lines) == 0
    assert await h.ledger.add_logs(run.id, 1, [LogLineIn(ts=t0, message="four")]) == 1
    assert await h.ledger.add_logs(run.id, 2, lines[:1]) == 1, "another attempt's line"
    assert await h.ledger.add_logs(run.id, 1, []) == 0

    stored = await h.ledger.get_logs(run.id)
    assert [(line.attempt_number, line.message) for line in stored] == [
        (1, "one"),
        (1, "two"),
        (1, "three"),
        (1, "four"),
        (2, "one"),
    ]
    assert [line.id for line in stored] == sorted(line.id for line in stored)
    assert stored[0].entry_id == "e1" and stored[1].entry_id == lines[1].key()
    assert stored[2].stream == "stderr" and stored[2].ts == t0 + timedelta(seconds=1)
    after = await h.ledger.get_logs(run.id, after_id=stored[1].id, limit=2)
    assert [line.message for line in after] == ["three", "four"]

    with pytest.raises(ValueError, match="timezone-aware"):
        await h.ledger.add_logs(run.id, 1, [LogLineIn(ts=datetime(2025, 1, 1), message="x")])
    with pytest.raises(StoreIntegrityError):
        await h.ledger.add_logs("01ZZZZZZZZZZZZZZZZZZZZZZZZ", 1, lines[:1])
    assert await h.ledger.get_logs("01ZZZZZZZZZZZZZZZZZZZZZZZZ") == []


# ----- queue stats -----


async def test_queue_stats_counts_waiting_in_flight_and_dead(h: Harness) -> None:
    a = [await enqueue(h.ledger, queue="a") for _ in range(6)]
    await enqueue(h.ledger, queue="b")
    await create(h.ledger)  # outside any queue: not counted
    assert await claim(h.ledger, queues=("a",), limit=3) == [r.id for r in a[:3]]
    assert await h.ledger.transition_run(a[1].id, "running")
    assert await h.ledger.finish_run(a[2].id, "dead")
    assert await h.ledger.transition_run(a[3].id, "succeeded", from_states={"pending"})

    assert await h.ledger.queue_stats() == [
        {"queue": "a", "pending": 2, "in_flight": 2, "dead": 1},
        {"queue": "b", "pending": 1, "in_flight": 0, "dead": 0},
    ]


# ----- blobs: job file contents, stored once -----


def _large_file_job(data: bytes) -> Any:
    from jobrunner.spec import Job

    text = data.hex()  # text content: the snapshot refers to it by digest once it is large
    return Job(
        name="big", image="alpine", cmd=["true"], files=[{"guest_path": "/srv/x", "content": text}]
    )


async def test_blob_put_and_get(h: Harness) -> None:
    import hashlib

    from jobrunner.store import BlobNotFound

    data = bytes(range(256)) * 1000
    digest = await h.ledger.put_blob(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert await h.ledger.put_blob(data) == digest  # content-addressed: the same key again
    assert await h.other().get_blob(digest) == data
    with pytest.raises(BlobNotFound):
        await h.ledger.get_blob("0" * 64)
    empty = await h.ledger.put_blob(b"")
    assert await h.ledger.get_blob(empty) == b""


async def test_runs_store_their_large_files_as_blobs_before_the_run(h: Harness) -> None:
    job = _large_file_job(b"\x01" * 40_000)
    snapshot = job.snapshot()
    [digest] = list(snapshot.blobs)
    assert snapshot["files"][0] == {"guest_path": "/srv/x", "sha256": digest, "size": 80_000}

    created = await create(h.ledger, job_snapshot=snapshot)
    [(queued, _)] = await h.ledger.enqueue_runs([req(job_snapshot=snapshot)])
    for run in (created, queued):
        stored = (await h.ledger.get_run(run.id)).job_snapshot
        assert stored == dict(snapshot)
        rebuilt = type(job).from_snapshot(stored)
        assert rebuilt.blob_digests() == [digest]
        blobs = {d: await h.other().get_blob(d) for d in rebuilt.blob_digests()}
        config = rebuilt.to_machine_config(environ={}, metadata={}, blobs=blobs)
        assert config == job.to_machine_config(environ={}, metadata={})


async def test_a_copied_snapshot_must_refer_to_stored_blobs(h: Harness) -> None:
    job = _large_file_job(b"\x02" * 40_000)
    copied = dict(job.snapshot())  # the bytes do not come along with a plain copy
    with pytest.raises(ValueError, match="does not hold"):
        await create(h.ledger, job_snapshot=copied)
    with pytest.raises(ValueError, match="does not hold"):
        await h.ledger.enqueue_runs([req(), req(job_snapshot=copied)])
    assert await h.ledger.list_runs() == []  # nothing of either was recorded
    await create(h.ledger, job_snapshot=job.snapshot())
    await create(h.ledger, job_snapshot=copied)  # now the ledger holds them
    assert len(await h.ledger.list_runs()) == 2
