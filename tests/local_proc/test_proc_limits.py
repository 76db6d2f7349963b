"""Environment isolation, CPU affinity, and memory limits (cgroup and RSS-watchdog fallback)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from jobrunner.local.process.cgroup import MemoryCgroup, find_cgroup_root
from jobrunner.local.process.supervisor import DEFAULT_PATH, pid_alive
from jobrunner.local.process.watchdog import RssWatchdog, group_rss_bytes

from .conftest import Starter, python

ALLOCATE_400MB = "b = bytearray(400 * 1024 * 1024); import time; time.sleep(10)"
ALLOCATE_50MB = "b = bytearray(50 * 1024 * 1024); print('ok')"


async def test_environment_is_exactly_the_spec(
    start: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBRUNNER_PARENT_ONLY", "must-not-leak")
    handle, output = await start(["env"], env={"GREETING": "hello world", "EMPTY": ""})
    assert (await handle.wait()).exit_code == 0
    assert sorted(output.lines()) == sorted(
        ["GREETING=hello world", "EMPTY=", f"PATH={DEFAULT_PATH}", "HOME=/root"]
    )


async def test_path_and_home_from_the_spec_win(start: Starter) -> None:
    env = {"PATH": "/bin:/usr/bin", "HOME": "/srv/app"}
    handle, output = await start(["env"], env=env)
    await handle.wait()
    assert sorted(output.lines()) == ["HOME=/srv/app", "PATH=/bin:/usr/bin"]


async def test_stdin_is_empty_and_cwd_is_the_workdir(start: Starter, workdir: Path) -> None:
    handle, output = await start(
        python("import os, sys; print(repr(sys.stdin.read()), os.getcwd())")
    )
    await handle.wait()
    assert output.lines() == [f"'' {workdir}"]


@pytest.mark.parametrize("cpus", [1, 64])
async def test_cpu_affinity_is_min_of_cpus_and_available(start: Starter, cpus: int) -> None:
    handle, output = await start(
        python("import os; print(len(os.sched_getaffinity(0)))"), cpus=cpus
    )
    await handle.wait()
    assert output.lines() == [str(min(cpus, len(os.sched_getaffinity(0))))]


async def test_limits_hold_from_the_first_instruction(start: Starter) -> None:
    # A job started directly (no launcher) gets its CPU mask and memory cgroup by inheritance
    # at the spawn, not a moment later: `nproc` and `cat` run long before Python could.
    root, reason = find_cgroup_root()
    assert root is not None, f"memory cgroups are expected on this machine: {reason}"
    for _ in range(10):
        handle, output = await start(["nproc"], cpus=1)
        await handle.wait()
        assert output.lines() == ["1"]
        handle, output = await start(["cat", "/proc/self/cgroup"], memory_mb=64)
        await handle.wait()
        memory = [  # the memory hierarchy's line (v1), or the unified one (v2)
            line
            for line in output.lines()
            if ("memory" in line.split(":")[1].split(","))
            or (root.version == 2 and line.startswith("0::"))
        ]
        assert memory and "/jobrunner/" in memory[0], output.lines()


async def test_memory_cgroup_kills_an_oversized_process(start: Starter) -> None:
    root, reason = find_cgroup_root()
    assert root is not None, f"memory cgroups are expected on this machine: {reason}"
    began = time.monotonic()
    handle, _ = await start(python(ALLOCATE_400MB), memory_mb=256)
    result = await handle.wait()
    assert time.monotonic() - began < 5
    assert (result.oom_killed, result.signal, result.exit_code) == (True, 9, 137)
    assert result.requested_stop is False


async def test_memory_cgroup_holds_the_process_and_is_removed_after(start: Starter) -> None:
    root, _ = find_cgroup_root()
    assert root is not None
    show_cgroup = "\nprint(open('/proc/self/cgroup').read())"
    handle, output = await start(python(ALLOCATE_50MB + show_cgroup), memory_mb=256)
    result = await handle.wait()
    assert (result.exit_code, result.oom_killed) == (0, False)
    assert output.lines()[0] == "ok"
    memory_line = next(line for line in output.lines() if ":memory:" in line)
    cgroup = memory_line.split(":", 2)[2]
    assert Path(cgroup).parent.name == "jobrunner"
    assert Path(cgroup).name.startswith("test-machine-")
    assert not (root.path / Path(cgroup).name).exists()  # removed after the exit


async def test_watchdog_kills_an_oversized_process(start: Starter) -> None:
    began = time.monotonic()
    handle, _ = await start(python(ALLOCATE_400MB), memory_mb=256, memory_enforcement="watchdog")
    result = await handle.wait()
    assert time.monotonic() - began < 5
    assert (result.oom_killed, result.signal, result.exit_code) == (True, 9, 137)


async def test_watchdog_leaves_a_small_process_alone(start: Starter) -> None:
    handle, output = await start(
        python(ALLOCATE_50MB + "\nimport time; time.sleep(0.3)"),
        memory_mb=256,
        memory_enforcement="watchdog",
    )
    result = await handle.wait()
    assert (result.exit_code, result.oom_killed) == (0, False)
    assert output.lines() == ["ok"]


def test_group_rss_counts_this_process_group() -> None:
    assert group_rss_bytes()[os.getpgid(0)] > 1024 * 1024


async def test_watchdog_calls_back_once_for_a_group_over_its_limit() -> None:
    dog = RssWatchdog(interval=0.01)
    calls: list[str] = []
    dog.watch(os.getpgid(0), 1024, lambda: calls.append("over"))
    dog.check_once()
    dog.check_once()
    assert calls == ["over"]
    await dog.aclose()


@pytest.mark.parametrize(
    ("version", "limit_file", "events_file", "events"),
    [
        (
            1,
            "memory.limit_in_bytes",
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        ),
        (2, "memory.max", "memory.events", "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n"),
    ],
)
def test_cgroup_files_per_version(
    tmp_path: Path, version: int, limit_file: str, events_file: str, events: str
) -> None:
    group = MemoryCgroup(tmp_path / "g", version)
    group.path.mkdir()
    assert group.oom_kills() == 0  # no counter file yet
    group.set_limit(256 * 1024 * 1024)
    assert (group.path / limit_file).read_text() == str(256 * 1024 * 1024)
    (group.path / events_file).write_text(events)
    assert group.oom_kills() == (2 if version == 1 else 1)
    if version == 2:
        assert (group.path / "memory.swap.max").read_text() == "0"
        assert (group.path / "memory.oom.group").read_text() == "1"
    (group.path / "cgroup.procs").write_text("")
    assert group.pids() == []
    assert group.remove() is False  # a real cgroup dir is empty; this fake one has files


async def test_memory_cgroup_also_kills_children_that_left_the_group(start: Starter) -> None:
    # `setsid` puts the child in a new session, out of reach of a process-group kill; it is still
    # in the machine's cgroup. It also holds the output pipe, which must not delay wait().
    handle, output = await start(["sh", "-c", "setsid sleep 30 & echo $!"], memory_mb=256)
    began = time.monotonic()
    result = await handle.wait()
    assert time.monotonic() - began < 1.5
    assert result.exit_code == 0
    escaped = int(output.lines()[0])
    deadline = time.monotonic() + 2
    while pid_alive(escaped) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not pid_alive(escaped)
