"""enqueue() commits queued runs for the workers; a Worker in the same event loop runs them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
import pytest

from jobrunner.api import AsyncJobRunner
from jobrunner.config import Settings
from jobrunner.errors import ConfigError
from jobrunner.handles import as_completed
from jobrunner.queue import QueueOptions
from jobrunner.session import open_runner
from jobrunner.states import RunState
from jobrunner.store import resolve_url
from jobrunner.wakeup import Wakeup
from jobrunner.worker import Worker
from tests.api.conftest import WAIT, sh, until


@asynccontextmanager
async def worker(
    queues: list[str], *, concurrency: int = 4, poll_interval: float = 0.2, wake: bool = False
) -> AsyncIterator[Worker]:
    """A Worker with its own Runner (another claim owner, as another process would be)."""
    settings = Settings.from_env()
    wakeup = None
    if wake:
        wakeup = await Wakeup.open(database_url=resolve_url(None), home=settings.home)
    try:
        async with open_runner(settings) as runner, anyio.create_task_group() as group:
            the_worker = Worker(
                runner,
                queues=queues,
                concurrency=concurrency,
                poll_interval=poll_interval,
                grace=5.0,
                wakeup=wakeup,
            )
            group.start_soon(the_worker.run)
            try:
                yield the_worker
            finally:
                the_worker.stop()
    finally:
        if wakeup is not None:
            await wakeup.aclose()


async def test_enqueue_returns_at_once_and_only_a_worker_runs_the_run(any_ledger: str) -> None:
    async with AsyncJobRunner.from_env() as jr:
        handles = [await jr.enqueue(sh(f"queued-{n}", f"echo {n}"), queue="work") for n in range(5)]
        assert all(h.state is RunState.PENDING and h.record.queue == "work" for h in handles)
        assert all(h.record.owner is None for h in handles)  # left to the workers
        # Waiting on a queued run polls the ledger: it never drives the run itself.
        with pytest.raises(TimeoutError):
            await handles[0].wait(timeout=0.5)
        assert await handles[0].refresh() is RunState.PENDING

        async with worker(["work"]) as the_worker:
            results = [await h.wait(WAIT) for h in handles]
        assert [r.outcome for r in results] == [RunState.SUCCEEDED] * 5
        assert the_worker.stats.finished == 5
        for n, handle in enumerate(handles):

            async def stored(handle: Any = handle, n: int = n) -> bool:
                return bool(await handle.logs() == [str(n)])

            # The worker copies the last lines just after it records the outcome.
            await until(stored)


async def test_an_idempotency_key_gives_back_the_same_run(any_ledger: str) -> None:
    async with AsyncJobRunner.from_env() as jr:
        job = sh("once", "echo once")
        first = await jr.enqueue(job, queue="idem", idempotency_key="order-42")
        again = await jr.enqueue(job, queue="idem", idempotency_key="order-42")
        other = await jr.enqueue(job, queue="idem", idempotency_key="order-43")
        assert again.id == first.id and again == first
        assert other.id != first.id
        runs = await jr.runner.ledger.list_runs(job="once")
        assert sorted(r.id for r in runs) == sorted({first.id, other.id})


async def test_higher_priority_runs_start_first(any_ledger: str) -> None:
    async with AsyncJobRunner.from_env() as jr:
        priorities = [0, 10, 5, -1, 7]
        handles = [
            await jr.enqueue(sh(f"p{p}", "true"), queue="prio", priority=p) for p in priorities
        ]
        async with worker(["prio"], concurrency=1):
            results = [await h.wait(WAIT) for h in handles]
    order = [r.job for r in sorted(results, key=lambda r: r.started_at or datetime.max)]
    assert order == ["p10", "p7", "p5", "p0", "p-1"]


async def test_enqueue_many_writes_every_run_in_one_transaction(
    any_ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with AsyncJobRunner.from_env() as jr:
        ledger = jr.runner.ledger
        calls: list[int] = []
        real = ledger.enqueue_runs

        async def spy(requests: Any, **kwargs: Any) -> Any:
            calls.append(len(requests))
            return await real(requests, **kwargs)

        monkeypatch.setattr(ledger, "enqueue_runs", spy)
        handles = await jr.enqueue_many(
            [
                sh("batch-a", "echo a"),
                (sh("batch-b", "echo b"), QueueOptions(queue="batch", priority=3)),
                sh("batch-c", "echo c"),
            ],
            queue="batch",
        )
        assert calls == [3]  # one ledger call: one transaction
        assert [h.record.job_name for h in handles] == ["batch-a", "batch-b", "batch-c"]
        assert [h.record.priority for h in handles] == [0, 3, 0]

        # One bad item and nothing is written, not even the good ones before it.
        with pytest.raises(ConfigError, match="queue name"):
            await jr.enqueue_many(
                [sh("good", "true"), (sh("bad", "true"), QueueOptions(queue="no spaces"))]
            )
        assert calls == [3]
        assert await ledger.list_runs(job="good") == []
        assert await jr.enqueue_many([]) == []

        async with worker(["batch"]):
            results = [h async for h in as_completed(handles, timeout=WAIT)]
        assert {h.id for h in results} == {h.id for h in handles}
        assert [(await h.result()).ok for h in handles] == [True] * 3


async def test_an_enqueue_wakes_an_idle_worker_at_once() -> None:
    # The worker polls only every 60 s: only the wake-up can start the second run in time.
    async with (
        AsyncJobRunner.from_env() as jr,
        worker(["wake"], poll_interval=60.0, wake=True) as the_worker,
    ):
        first = await jr.enqueue(sh("warm-up", "true"), queue="wake")
        assert (await first.wait(WAIT)).ok

        async def idle() -> bool:
            return the_worker.in_flight == 0

        await until(idle)
        second = await jr.enqueue(sh("woken", "true"), queue="wake")
        assert (await second.wait(timeout=20)).ok


async def test_a_queued_run_can_be_cancelled_before_any_worker_takes_it() -> None:
    async with AsyncJobRunner.from_env() as jr:
        handle = await jr.enqueue(sh("never", "echo never"), queue="nobody")
        assert await handle.cancel() is True
        result = await handle.wait(WAIT)
        assert (result.outcome, result.attempts, result.machine_id) == (
            RunState.CANCELLED,
            0,
            None,
        )


async def test_queue_options_are_checked_before_anything_is_written() -> None:
    async with AsyncJobRunner.from_env() as jr:
        job = sh("checked", "true")
        with pytest.raises(ValueError, match="timezone-aware"):
            await jr.enqueue(job, run_at=datetime(2030, 1, 1))
        with pytest.raises(ValueError, match="not both"):
            await jr.enqueue(job, run_at=datetime(2030, 1, 1).astimezone(), delay=5)
        with pytest.raises(ValueError, match="priority"):
            await jr.enqueue(job, priority="high")  # type: ignore[arg-type]
        assert await jr.runner.ledger.list_runs(job="checked") == []
        later = await jr.enqueue(job, delay=3600)
        assert later.record.next_attempt_at is not None
