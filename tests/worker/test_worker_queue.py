"""A Worker and its Runner on one event loop, on the local backend: what a user of the queue sees.

Priority order, delayed runs, idempotency keys, per-queue limits over two workers, and the
graceful stop. Ledgers: SQLite in tmp_path and, where it makes no difference to the engine,
``jobrunner.testing.MemoryLedger`` as well.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise

import anyio
import pytest

from jobrunner.clock import Clock
from jobrunner.machines import AsyncMachinesClient
from jobrunner.queue import QueueOptions, requests_for
from jobrunner.spec import Job
from jobrunner.states import ACTIVE_STATES, TERMINAL_STATES
from jobrunner.store import Ledger, Run, RunRequest, SqlLedger, Store
from jobrunner.store.errors import StoreError
from jobrunner.testing import MemoryLedger
from jobrunner.worker import Worker, WorkerStats

from .conftest import APP, WAIT, make_runner, running_worker, sh, until


async def enqueue(ledger: Ledger, job: Job, **options: object) -> tuple[Run, bool]:
    [row] = await ledger.enqueue_runs(
        requests_for([(job, QueueOptions(**options))], backend="local", app=APP)  # type: ignore[arg-type]
    )
    return row


async def finished(ledger: Ledger, *run_ids: str) -> bool:
    for run_id in run_ids:
        if (await ledger.get_run(run_id)).state not in TERMINAL_STATES:
            return False
    return True


async def test_the_higher_priority_run_is_started_first(
    client: AsyncMachinesClient, ledger: Ledger
) -> None:
    """Runs queued while no worker runs: the high-priority one, queued last, goes first; the
    others follow in the order they were queued."""
    low_a, _ = await enqueue(ledger, sh("low-a", "echo a"))
    low_b, _ = await enqueue(ledger, sh("low-b", "echo b"))
    high, _ = await enqueue(ledger, sh("high", "echo high"), priority=10)

    async with running_worker(client, ledger, concurrency=1) as running:
        await until(lambda: finished(ledger, low_a.id, low_b.id, high.id), what="all 3 finished")

    created = {}
    for run_id in (low_a.id, low_b.id, high.id):
        assert (await ledger.get_run(run_id)).state == "succeeded"
        [attempt] = await ledger.get_attempts(run_id)
        created[run_id] = attempt.created_at
    assert sorted(created, key=created.__getitem__) == [high.id, low_a.id, low_b.id]
    # The machines, too, were made one at a time in that order.
    creating = {}
    for run_id in created:
        [moment] = [t.at for t in await ledger.transitions(run_id) if t.to_state == "creating"]
        creating[run_id] = moment
    assert sorted(creating, key=creating.__getitem__) == [high.id, low_a.id, low_b.id]
    assert running.stats == [WorkerStats(claimed=3, finished=3)]


async def test_a_delayed_run_is_not_claimed_before_its_time(
    client: AsyncMachinesClient, ledger: Ledger
) -> None:
    now_run, _ = await enqueue(ledger, sh("now", "echo now"))
    delayed, _ = await enqueue(ledger, sh("later", "echo later"), delay=2)
    run_at = datetime.now(UTC) + timedelta(seconds=2.5)
    scheduled, _ = await enqueue(ledger, sh("at", "echo at"), run_at=run_at)
    assert delayed.next_attempt_at is not None and scheduled.next_attempt_at == run_at
    due = delayed.next_attempt_at

    async with running_worker(client, ledger, concurrency=4):
        await until(lambda: finished(ledger, now_run.id), what="the undelayed run finished")
        # Until just before its time, nobody claims the delayed run nor makes it an attempt.
        while datetime.now(UTC) < due - timedelta(seconds=0.2):
            for waiting in (delayed, scheduled):
                run = await ledger.get_run(waiting.id)
                assert run.state == "pending" and run.owner is None, run
                assert await ledger.get_attempts(waiting.id) == []
            await anyio.sleep(0.05)
        await until(lambda: finished(ledger, delayed.id, scheduled.id), what="delayed runs done")

    for run, not_before in ((delayed, due), (scheduled, run_at)):
        assert (await ledger.get_run(run.id)).state == "succeeded"
        [attempt] = await ledger.get_attempts(run.id)
        assert attempt.created_at >= not_before
    [first] = await ledger.get_attempts(now_run.id)
    assert first.created_at < due


async def test_an_idempotency_key_names_one_run_until_its_window_ends(
    client: AsyncMachinesClient, ledger: Ledger
) -> None:
    job = sh("nightly", "echo once")
    first, created = await enqueue(ledger, job, idempotency_key="nightly-2024-06-01")
    again, created_again = await enqueue(ledger, job, idempotency_key="nightly-2024-06-01")
    assert created and not created_again and again.id == first.id
    # Twice in one batch: still the one run.
    rows = await ledger.enqueue_runs(
        requests_for(
            [(job, QueueOptions(idempotency_key="nightly-2024-06-01"))] * 2,
            backend="local",
            app=APP,
        )
    )
    assert [(r.id, c) for r, c in rows] == [(first.id, False), (first.id, False)]

    async with running_worker(client, ledger):
        await until(lambda: finished(ledger, first.id), what="the run finished")
    done = await ledger.get_run(first.id)
    assert done.state == "succeeded"

    # Finished, within the window (24 h by default): the same run, not run again.
    after, created_after = await enqueue(ledger, job, idempotency_key="nightly-2024-06-01")
    assert not created_after and after.id == first.id and after.state == "succeeded"
    assert len(await ledger.get_attempts(first.id)) == 1
    assert [r.id for r in await ledger.list_runs(job="nightly")] == [first.id]

    # Outside the window, the key names a new run.
    [(fresh, created_fresh)] = await ledger.enqueue_runs(
        requests_for(
            [(job, QueueOptions(idempotency_key="nightly-2024-06-01"))], backend="local", app=APP
        ),
        idempotency_window=timedelta(0),
    )
    assert created_fresh and fresh.id != first.id and fresh.state == "pending"


class FakeClock(Clock):
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def time(self) -> float:
        return self.t


async def test_the_idempotency_window_counts_from_the_end_of_the_run_memory_ledger() -> None:
    """No API needed: the window on MemoryLedger, with time moved instead of waited for."""
    clock = FakeClock()
    ledger = MemoryLedger(clock)
    job = sh("report", "true")
    run, _ = await enqueue(ledger, job, idempotency_key="report")
    clock.t += 7 * 86400  # unfinished: the key names it however old it is
    assert (await enqueue(ledger, job, idempotency_key="report"))[0].id == run.id
    assert await ledger.finish_run(run.id, "succeeded", exit_code=0)
    clock.t += 23 * 3600
    assert (await enqueue(ledger, job, idempotency_key="report")) == (
        await ledger.get_run(run.id),
        False,
    )
    clock.t += 2 * 3600  # 25 h after it finished
    newer, created = await enqueue(ledger, job, idempotency_key="report")
    assert created and newer.id != run.id


async def test_a_queue_limit_holds_across_two_workers(
    client: AsyncMachinesClient, ledger_url: str
) -> None:
    """Two workers (each its own Store on one SQLite file, as two processes would have) and a
    limit of 1 on "slow": never two slow runs in flight; the other queue is not held up."""
    with Store(ledger_url) as store_a, Store(ledger_url) as store_b, Store(ledger_url) as watch:
        ledger = SqlLedger(store_a)
        slow = [
            (await enqueue(ledger, sh(f"slow-{n}", f"sleep 1; echo {n}"), queue="slow"))[0]
            for n in range(4)
        ]
        fast = [
            (await enqueue(ledger, sh(f"fast-{n}", f"echo {n}"), queue="fast"))[0] for n in range(2)
        ]
        everything = [r.id for r in slow + fast]
        most = 0
        options = {"queues": ["slow", "fast"], "concurrency": 4, "queue_limits": {"slow": 1}}
        async with (
            running_worker(client, store_a, **options) as one,
            running_worker(client, store_b, **options) as two,
        ):
            with anyio.fail_after(WAIT):
                while not all(watch.get_run(r).state in TERMINAL_STATES for r in everything):
                    active = watch.list_runs(state=sorted(ACTIVE_STATES), limit=None)
                    in_flight = [
                        r
                        for r in active
                        if r.queue == "slow" and (r.owner is not None or r.state != "pending")
                    ]
                    most = max(most, len(in_flight))
                    assert len(in_flight) <= 1, in_flight
                    await anyio.sleep(0.02)

        assert most == 1
        assert all(watch.get_run(r).state == "succeeded" for r in everything)
        assert sum(s.finished for w in (one, two) for s in w.stats) == 6
        # After the fact, from the attempts: the slow runs' lifetimes never overlap.
        spans = sorted(
            (a.created_at, a.finished_at) for r in slow for a in watch.get_attempts(r.id)
        )
        assert len(spans) == 4
        for (_, end), (start, _) in pairwise(spans):
            assert end is not None and end <= start
        # The limit on "slow" did not make "fast" wait for the slow runs.
        last_slow_end = max(end for _, end in spans if end is not None)
        for run in fast:
            [attempt] = watch.get_attempts(run.id)
            assert attempt.finished_at is not None and attempt.finished_at < last_slow_end


@pytest.fixture
def store_ledger(sqlite_store: Store) -> Ledger:
    return SqlLedger(sqlite_store)


async def test_stop_lets_the_run_in_hand_finish_within_the_grace(
    client: AsyncMachinesClient, store_ledger: Ledger
) -> None:
    ledger = store_ledger
    run, _ = await enqueue(ledger, sh("graceful", "sleep 5; echo done"))
    runner = make_runner(client, ledger)
    worker = Worker(runner, grace=30.0, poll_interval=0.1)
    stats: list[WorkerStats] = []
    returned = anyio.Event()

    async def work() -> None:
        stats.append(await worker.run())
        returned.set()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(work)
            await until(lambda: _state_is(ledger, run.id, "running"), what="the run running")
            worker.stop()
            stopped_at = anyio.current_time()
            # Stopped: a run queued now is left for another worker.
            late, _ = await enqueue(ledger, sh("late", "echo late"))
            with anyio.fail_after(WAIT):
                await returned.wait()
            waited = anyio.current_time() - stopped_at
    finally:
        await runner.aclose()

    done = await ledger.get_run(run.id)
    assert done.state == "succeeded" and done.owner is None
    assert waited < 25, "run() returned when the run ended, not when the grace ran out"
    assert stats == [WorkerStats(claimed=1, finished=1)]
    left = await ledger.get_run(late.id)
    assert left.state == "pending" and left.owner is None
    assert await ledger.get_attempts(late.id) == []


async def _state_is(ledger: Ledger, run_id: str, state: str) -> bool:
    return (await ledger.get_run(run_id)).state == state


async def test_after_a_short_grace_the_run_is_released_and_another_worker_adopts_it(
    client: AsyncMachinesClient, store_ledger: Ledger
) -> None:
    ledger = store_ledger
    run, _ = await enqueue(ledger, sh("handover", "sleep 5; echo finished; exit 7"))
    runner = make_runner(client, ledger)
    worker = Worker(runner, grace=0.5, poll_interval=0.1)
    stats: list[WorkerStats] = []
    try:
        async with anyio.create_task_group() as group:

            async def work() -> None:
                stats.append(await worker.run())

            group.start_soon(work)
            await until(lambda: _state_is(ledger, run.id, "running"), what="the run running")
            worker.stop()
            with anyio.fail_after(15):
                while not stats:
                    await anyio.sleep(0.02)
    finally:
        await runner.aclose()

    # Released unfinished: nobody holds it, and its machine goes on.
    released = await ledger.get_run(run.id)
    assert released.state == "running" and released.owner is None
    assert stats == [WorkerStats(claimed=1, released=1)]
    [attempt] = await ledger.get_attempts(run.id)
    assert attempt.machine_id is not None and attempt.outcome is None
    machine = await client.get_machine(attempt.machine_id)
    assert machine.state == "started", machine.state

    async with running_worker(client, ledger, orphan_interval=0.2) as second:
        await until(lambda: finished(ledger, run.id), what="the adopted run finished")

    done = await ledger.get_run(run.id)
    # A queued run that failed with no attempt left is dead, with the job's own exit code.
    assert done.state == "dead" and done.exit_code == 7
    assert [a.machine_id for a in await ledger.get_attempts(run.id)] == [attempt.machine_id]
    terminal = [t for t in await ledger.transitions(run.id) if t.to_state in TERMINAL_STATES]
    assert len(terminal) == 1
    assert second.stats[0].adopted == 1 and second.stats[0].claimed == 0
    await until(
        lambda: _logs_are(ledger, run.id, ["finished"]), timeout=15, what="the log line copied"
    )


async def _logs_are(ledger: Ledger, run_id: str, lines: list[str]) -> bool:
    return [line.message for line in await ledger.get_logs(run_id)] == lines


async def test_a_run_that_cannot_be_driven_does_not_break_the_concurrency_limit(
    client: AsyncMachinesClient, store_ledger: Ledger
) -> None:
    """A queued run whose stored job is unusable fails every drive. Each failed drive rests in
    its slot (ERROR_BACKOFF, 2 s) but the run's claim is released, so the worker claims it again
    meanwhile: every such drive must take a slot of its own, or the worker re-drives the run at
    its poll rate with no bound on the drives in flight (it did: 61 claims in 7 s at concurrency
    2 before worker.py counted drives instead of run ids)."""
    ledger = store_ledger
    snapshot = sh("poison", "true").snapshot()
    snapshot["env"] = {"BAD": "\udcff"}
    [(poison, _)] = await ledger.enqueue_runs(
        [
            RunRequest(
                job_name="poison",
                job_snapshot=snapshot,
                backend="local",
                app=APP,
                region=None,
                max_attempts=1,
                timeout_s=None,
                queue="default",
            )
        ]
    )
    healthy, _ = await enqueue(ledger, sh("healthy", "echo fine"))
    async with running_worker(client, ledger, concurrency=2, poll_interval=0.05) as running:
        worker = running.worker
        start = anyio.current_time()
        most = 0
        while anyio.current_time() - start < 3.0:  # an observation window, not a wait
            most = max(most, worker.in_flight)
            assert worker.in_flight <= 2
            await anyio.sleep(0.01)
        claims = worker.stats.claimed
        await until(lambda: finished(ledger, healthy.id), what="the healthy run finished")
    # Two slots, each resting 2 s after a failed drive: at most 2 + 2 * 3 / 2 claims in 3 s
    # (the healthy run's claim included).
    assert claims <= 6, claims
    assert most == 2
    assert (await ledger.get_run(healthy.id)).state == "succeeded"
    assert (await ledger.get_run(poison.id)).owner is None  # left unclaimed for whoever is next


async def test_lines_a_driver_never_copied_are_copied_by_whoever_comes_next(
    client: AsyncMachinesClient, store_ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = store_ledger
    first = make_runner(client, ledger)

    async def unreachable(*args: object) -> int:
        # Stands in for the driver dying before it stored a line (deterministically).
        raise StoreError("the ledger is unreachable")

    monkeypatch.setattr(first.logs, "_add_logs", unreachable)
    run = await first.submit(sh("last-words", "sleep 0.5; echo last"))
    assert (await first.wait(run.id)).state == "succeeded"
    await first.aclose()
    assert await ledger.get_logs(run.id) == []

    second = make_runner(client, ledger)
    try:
        await second.reconcile()
        async with running_worker(client, ledger):
            await until(
                lambda: _logs_are(ledger, run.id, ["last"]), timeout=5, what="the line copied"
            )
    finally:
        await second.aclose()
