"""Many runs at once: map, as_completed, the Executor, and the sync API from several threads."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from jobrunner.api import AsyncJobRunner, JobRunner
from jobrunner.handles import AsyncRunHandle, RunExecutor, RunHandle, RunResult, as_completed
from jobrunner.states import RunState
from tests.api.conftest import WAIT, max_overlap, sh, until_sync


async def test_map_keeps_the_order_and_the_concurrency_cap() -> None:
    jobs = [sh(f"m{n}", f"sleep 0.{9 - n}; echo {n}") for n in range(6)]
    async with AsyncJobRunner.from_env() as jr:
        results = await jr.map(jobs, concurrency=2)
    assert [r.job for r in results] == [f"m{n}" for n in range(6)]
    assert all(r.ok for r in results)
    assert max_overlap(results) == 2  # two at a time, never three
    with pytest.raises(ValueError, match="concurrency"):
        async with AsyncJobRunner.from_env() as jr:
            await jr.map(jobs, concurrency=0)


async def test_as_completed_yields_async_handles_in_finishing_order() -> None:
    async with AsyncJobRunner.from_env() as jr:
        slow = await jr.submit(sh("slow", "sleep 3"))
        fast = await jr.submit(sh("fast", "true"))
        order = [h async for h in as_completed([slow, fast, slow], timeout=WAIT)]
        assert order == [fast, slow]  # each handle once, the first to finish first
        assert all(isinstance(h, AsyncRunHandle) for h in order)

        stuck = await jr.submit(sh("stuck", "sleep 60"))
        with pytest.raises(TimeoutError, match="1 of 1"):
            async for _ in as_completed([stuck], timeout=0.5):
                pass
        await stuck.cancel()
        assert (await stuck.wait(WAIT)).outcome is RunState.CANCELLED


def test_as_completed_gives_a_plain_iterator_for_sync_handles() -> None:
    with JobRunner.from_env() as jr:
        handles = [jr.submit(sh(f"s{n}", f"sleep {n}")) for n in (2, 0, 1)]
        order = [h.result().job for h in as_completed(handles, WAIT)]
        assert order == ["s0", "s1", "s2"]
        assert all(isinstance(h, RunHandle) for h in handles)
        with pytest.raises(TypeError, match="not a mix"):
            as_completed([handles[0], handles[0]._core])  # type: ignore[call-overload]
    assert list(as_completed([])) == []


async def test_as_completed_of_nothing_works_both_ways() -> None:
    assert [h async for h in as_completed([])] == []  # type: ignore[var-annotated]


def test_as_completed_over_handles_of_two_runners() -> None:
    with JobRunner.from_env() as one, JobRunner.from_env() as two:
        handles = [one.submit(sh("one", "sleep 1")), two.submit(sh("two", "true"))]
        assert [h.result().job for h in as_completed(handles, WAIT)] == ["two", "one"]


def test_the_executor_runs_jobs_as_futures_within_max_workers() -> None:
    with JobRunner.from_env() as jr:
        with jr.executor(max_workers=2) as executor:
            assert isinstance(executor, concurrent.futures.Executor)
            assert isinstance(executor, RunExecutor) and executor.max_workers == 2
            futures = [executor.submit(sh(f"x{n}", f"sleep 0.5; echo {n}")) for n in range(5)]
            failing = executor.submit(sh("bad", "exit 2"))
            overridden = executor.submit(sh("env", "echo $V"), env={"V": "over"})
        # Leaving the block is shutdown(wait=True): every future is done.
        assert all(f.done() for f in [*futures, failing, overridden])
        results: list[RunResult] = [f.result() for f in futures]
        assert [r.job for r in results] == [f"x{n}" for n in range(5)] and all(
            r.ok for r in results
        )
        assert max_overlap(results) <= 2
        assert failing.result().exit_code == 2
        assert jr.get(overridden.result().id).logs() == ["over"]

        with pytest.raises(RuntimeError, match="after shutdown"):
            executor.submit(sh("late", "true"))


def test_the_executor_refuses_callables_and_can_drop_pending_work() -> None:
    with JobRunner.from_env() as jr:
        executor = jr.executor(max_workers=1)
        with pytest.raises(TypeError, match="not a function"):
            executor.submit(print, "hello")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not a function"):
            list(executor.map(print, ["hello"]))
        with pytest.raises(ValueError, match="max_workers"):
            jr.executor(max_workers=0)

        running = executor.submit(sh("first", "sleep 2"))
        waiting = [executor.submit(sh(f"queued{n}", "true")) for n in range(3)]
        until_sync(running.running)
        assert not any(f.running() for f in waiting)  # max_workers=1: they wait for the slot
        executor.shutdown(wait=True, cancel_futures=True)
        assert running.result().ok
        assert all(f.cancelled() for f in waiting)


def test_one_sync_runner_serves_four_threads_at_once() -> None:
    results: dict[int, tuple[RunResult, list[str], RunState]] = {}
    errors: list[BaseException] = []
    with JobRunner.from_env() as jr:

        def work(n: int) -> None:
            try:
                handle = jr.submit(sh(f"t{n}", f"echo thread-{n}"))
                queued = jr.enqueue(sh(f"q{n}", "true"), queue=f"thread-{n}")
                result = handle.wait(WAIT)
                again = jr.get(handle.id)
                results[n] = (result, again.logs(), jr.get(queued.id).refresh())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
    assert errors == []
    assert sorted(results) == [0, 1, 2, 3]
    for n, (result, lines, queued_state) in results.items():
        assert result.ok and result.job == f"t{n}"
        assert lines == [f"thread-{n}"]
        assert queued_state is RunState.PENDING
    assert len({result.id for result, _, _ in results.values()}) == 4
