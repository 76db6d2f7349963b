"""Exit codes, signals, stop/kill, suspend/resume, and nothing left behind after an exit."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from jobrunner.local.process.supervisor import pid_alive

from .conftest import Starter, python, zombie_children

IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "


@pytest.mark.parametrize("code", [0, 3])
async def test_exit_code_is_reported(start: Starter, code: int) -> None:
    handle, _ = await start(["sh", "-c", f"exit {code}"])
    result = await handle.wait()
    assert (result.exit_code, result.signal, result.error) == (code, None, None)
    assert result.requested_stop is False
    assert result.oom_killed is False
    assert result.exited_at.utcoffset() is not None
    assert result.exited_at >= handle.started_at
    assert handle.exited


async def test_death_by_signal_is_128_plus_signal(start: Starter) -> None:
    handle, _ = await start(["sh", "-c", "kill -USR1 $$"])
    result = await handle.wait()
    assert (result.exit_code, result.signal) == (128 + signal.SIGUSR1, signal.SIGUSR1)
    assert result.requested_stop is False


async def test_stop_escalates_to_sigkill_when_signal_is_ignored(start: Starter) -> None:
    handle, output = await start(python(IGNORE_TERM + "print('ready'); time.sleep(60)"))
    await output.wait_for(lambda o: o.lines() == ["ready"])
    began = time.monotonic()
    result = await handle.stop(signal.SIGTERM, timeout=0.5)
    assert 0.5 <= time.monotonic() - began < 3
    assert (result.exit_code, result.signal, result.requested_stop) == (137, 9, True)


async def test_stop_with_default_sigint(start: Starter) -> None:
    handle, _ = await start(["sleep", "30"])
    result = await handle.stop()
    assert (result.exit_code, result.signal, result.requested_stop) == (130, signal.SIGINT, True)


async def test_stop_lets_a_program_exit_cleanly(start: Starter) -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('bye'), sys.exit(0)))\n"
        "print('ready')\n"
        "time.sleep(60)\n"
    )
    handle, output = await start(python(code))
    await output.wait_for(lambda o: o.lines() == ["ready"])
    result = await handle.stop(signal.SIGTERM, timeout=5)
    assert (result.exit_code, result.signal, result.requested_stop) == (0, None, True)
    assert output.lines() == ["ready", "bye"]


async def test_kill_and_every_waiter_gets_the_same_exit(start: Starter) -> None:
    handle, _ = await start(["sleep", "30"])
    waiters = [asyncio.ensure_future(handle.wait()) for _ in range(3)]
    handle.kill()
    results = await asyncio.gather(*waiters)
    assert results[0] == results[1] == results[2]
    assert (results[0].exit_code, results[0].requested_stop) == (137, True)
    assert await handle.stop() == results[0]  # stopping an exited process just reports it


async def test_signals_after_exit_are_ignored(start: Starter) -> None:
    handle, _ = await start(["true"])
    await handle.wait()
    handle.send_signal(signal.SIGTERM)
    handle.suspend()
    handle.resume()
    handle.kill()
    assert (await handle.wait()).requested_stop is False


async def test_send_signal_reaches_the_program(start: Starter) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: print('got usr1'))\n"
        "print('ready')\n"
        "time.sleep(0.5)\n"
        "time.sleep(0.5)\n"
    )
    handle, output = await start(python(code))
    await output.wait_for(lambda o: o.lines() == ["ready"])
    handle.send_signal(signal.SIGUSR1)
    await output.wait_for(lambda o: "got usr1" in o.lines())
    handle.kill()


async def test_process_runs_in_its_own_session(start: Starter) -> None:
    handle, output = await start(python("import os; print(os.getpgid(0), os.getsid(0))"))
    await handle.wait()
    assert output.lines() == [f"{handle.pid} {handle.pid}"]


async def test_leftover_children_are_killed_and_nothing_is_a_zombie(start: Starter) -> None:
    handle, output = await start(["sh", "-c", "sleep 30 & echo $!; exit 0"])
    result = await handle.wait()
    assert result.exit_code == 0
    child = int(output.lines()[0])
    deadline = time.monotonic() + 2
    while pid_alive(child) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not pid_alive(child)
    assert not pid_alive(handle.pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(handle.pid, os.WNOHANG)  # already reaped
    assert zombie_children() == []


async def test_stop_kills_the_whole_group(start: Starter) -> None:
    handle, output = await start(
        ["sh", "-c", "trap '' TERM; sleep 30 & echo $!; wait"],
    )
    await output.wait_for(lambda o: len(o.lines()) == 1)
    child = int(output.lines()[0])
    result = await handle.stop(signal.SIGTERM, timeout=0.3)
    assert result.requested_stop
    await asyncio.sleep(0.05)
    assert not pid_alive(child)
    assert zombie_children() == []


COUNTER = (
    "import itertools, time\nfor i in itertools.count():\n    print(i)\n    time.sleep(0.03)\n"
)


async def test_suspend_pauses_output_and_resume_continues(start: Starter) -> None:
    handle, output = await start(python(COUNTER))
    await output.wait_for(lambda o: len(o.lines()) >= 3)
    handle.suspend()
    await asyncio.sleep(0.1)  # lines already in the pipe may still arrive
    paused_at = len(output.lines())
    await asyncio.sleep(0.4)
    assert len(output.lines()) == paused_at
    assert not handle.exited
    handle.resume()
    await output.wait_for(lambda o: len(o.lines()) >= paused_at + 3)
    assert output.lines() == [str(i) for i in range(len(output.lines()))]
    result = await handle.stop(signal.SIGTERM, timeout=2)
    assert (result.signal, result.requested_stop) == (signal.SIGTERM, True)


async def test_stop_works_on_a_suspended_process(start: Starter) -> None:
    handle, output = await start(python(COUNTER))
    await output.wait_for(lambda o: len(o.lines()) >= 1)
    handle.suspend()
    began = time.monotonic()
    result = await handle.stop(signal.SIGTERM, timeout=3)
    assert time.monotonic() - began < 2  # the signal acted; no wait for the SIGKILL
    assert (result.signal, result.requested_stop) == (signal.SIGTERM, True)
