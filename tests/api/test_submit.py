"""submit() drives a run in the background; its handle waits, reads logs, follows, cancels."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobrunner.api import AsyncJobRunner, JobRunner
from jobrunner.handles import AsyncRunHandle, RunHandle, RunnerClosed, RunResult
from jobrunner.states import RunState
from tests.api.conftest import WAIT, sh, until


async def test_submit_returns_at_once_and_the_result_says_how_it_ended() -> None:
    async with AsyncJobRunner.from_env() as jr:
        handle = await jr.submit(sh("hello", "echo one; echo two"))
        assert isinstance(handle, AsyncRunHandle)
        assert handle.state is RunState.PENDING  # recorded, the drive has not begun
        result = await handle.wait(timeout=WAIT)
        assert isinstance(result, RunResult)
        assert (result.id, result.job, result.outcome, result.exit_code) == (
            handle.id,
            "hello",
            RunState.SUCCEEDED,
            0,
        )
        assert result.ok and not result.oom_killed and result.attempts == 1
        assert result.machine_id and result.reason is None
        assert result.started_at and result.finished_at and result.duration_s is not None
        assert handle.state is RunState.SUCCEEDED
        assert await handle.result() == result
        # The drive ends only once the last lines are stored: no race with logs().
        assert await handle.logs() == ["one", "two"]


async def test_a_failed_run_is_a_result_not_an_exception() -> None:
    async with AsyncJobRunner.from_env() as jr:
        result = await jr.run(sh("fails", "echo oops >&2; exit 3"))
        assert (result.outcome, result.exit_code, result.ok) == (RunState.FAILED, 3, False)


async def test_overrides_env_and_timeout_apply_to_one_run() -> None:
    async with AsyncJobRunner.from_env() as jr:
        job = sh("env", "echo $GREETING", env={"GREETING": "hi"})
        overridden = await jr.submit(job, env={"GREETING": "bonjour"})
        plain = await jr.submit(job)
        await overridden.wait(WAIT)
        await plain.wait(WAIT)
        assert await overridden.logs() == ["bonjour"]
        assert await plain.logs() == ["hi"]

        slow = await jr.run(sh("slow", "sleep 30"), timeout=1)
        assert slow.outcome is RunState.TIMED_OUT

        with pytest.raises(TypeError, match="unknown override"):
            await jr.submit(job, image="busybox")  # type: ignore[call-arg]


async def test_jobs_are_found_by_name_or_path_like_the_cli(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "greet.toml").write_text('image = "alpine"\ncmd = ["sh", "-c", "echo from-file"]\n')
    async with AsyncJobRunner.from_env(jobs_dir=jobs) as jr:
        by_name = await jr.run("greet")
        by_path = await jr.run(jobs / "greet.toml")
        assert by_name.ok and by_path.ok and by_name.job == "greet"
        with pytest.raises(TypeError, match="expected a Job"):
            await jr.submit(42)  # type: ignore[arg-type]


async def test_wait_times_out_then_cancel_is_recorded_and_reported() -> None:
    async with AsyncJobRunner.from_env() as jr:
        handle = await jr.submit(sh("sleeper", "echo started; sleep 60"))
        with pytest.raises(TimeoutError, match=handle.id):
            await handle.wait(timeout=0.3)

        async def running() -> bool:
            return handle.state is RunState.RUNNING  # live: updated by the drive's events

        await until(running)
        assert await handle.refresh() is RunState.RUNNING
        assert await handle.cancel() is True
        assert handle.record.cancel_requested
        result = await handle.wait(WAIT)
        assert result.outcome is RunState.CANCELLED
        assert await handle.cancel() is False  # finished already: nothing recorded


async def test_follow_yields_lines_while_the_run_goes_then_stops() -> None:
    async with AsyncJobRunner.from_env() as jr:
        handle = await jr.submit(sh("chatty", "echo first; sleep 2; echo second"))
        seen: list[tuple[str, bool]] = []
        async for line in handle.follow(poll=0.05):
            seen.append((line, handle.state.is_finished))
        assert [line for line, _ in seen] == ["first", "second"]
        assert seen[0][1] is False  # the first line came while the run was still going
        assert handle.state is RunState.SUCCEEDED


async def test_a_second_runner_rebuilds_the_handle_from_the_id() -> None:
    async with AsyncJobRunner.from_env() as jr, AsyncJobRunner.from_env() as other:
        handle = await jr.submit(sh("shared", "echo a; sleep 1; echo b"))
        elsewhere = await other.get(handle.id[:10])  # a prefix is enough, as in the CLI
        assert elsewhere.id == handle.id and elsewhere == await other.get(handle.id)
        # Followed from the other runner (polling the ledger), all lines, then the end.
        assert [line async for line in elsewhere.follow(poll=0.05)] == ["a", "b"]
        result = await elsewhere.wait(WAIT)
        assert result == await handle.wait(WAIT)
        assert await elsewhere.logs() == ["a", "b"]
        assert await elsewhere.refresh() is RunState.SUCCEEDED


async def test_closing_releases_unfinished_drives_for_the_workers() -> None:
    jr = AsyncJobRunner.from_env()
    await jr.open()
    handle = await jr.submit(sh("left", "sleep 60"))

    async def running() -> bool:
        return handle.state is RunState.RUNNING

    await until(running)
    await jr.aclose()
    with pytest.raises(RunnerClosed, match="closed before run"):
        await handle.wait()
    with pytest.raises(RunnerClosed):
        await jr.submit(sh("late", "true"))

    async with AsyncJobRunner.from_env() as other:
        left = await other.get(handle.id)
        assert left.state is RunState.RUNNING  # the machine was left running...
        assert left.record.owner is None  # ...and the run released, for a worker to adopt
        assert await left.cancel() is True
        assert (await left.wait(WAIT)).outcome is RunState.CANCELLED


async def test_close_with_wait_lets_the_drives_finish() -> None:
    jr = AsyncJobRunner.from_env()
    await jr.open()
    handle = await jr.submit(sh("short", "sleep 1; echo done"))
    await jr.aclose(wait=True)
    assert (await handle.wait()).ok


def test_the_sync_face_forwards_every_call() -> None:
    with JobRunner.from_env() as jr:
        handle = jr.submit(sh("sync", "echo a; sleep 1; echo b"))
        assert isinstance(handle, RunHandle) and handle.state is RunState.PENDING
        assert list(handle.follow(poll=0.05)) == ["a", "b"]
        assert handle.result(timeout=WAIT).ok and handle.wait().ok
        assert handle.logs() == ["a", "b"] and handle.refresh() is RunState.SUCCEEDED
        assert jr.run(sh("direct", "exit 4")).exit_code == 4

        sleeper = jr.submit(sh("sync-sleeper", "sleep 60"))
        with pytest.raises(TimeoutError):
            sleeper.wait(timeout=0.2)
        assert sleeper.cancel() is True
        assert sleeper.wait(WAIT).outcome is RunState.CANCELLED
        assert jr.get(sleeper.id[:12]) == sleeper
    jr.close()  # a second close does nothing
    with pytest.raises(RunnerClosed, match="closed"):
        jr.submit(sh("late", "true"))
    with pytest.raises(RunnerClosed):
        handle.logs()
