"""resolve_argv, start failures, pid_alive and kill_orphan_group."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jobrunner.local.process import spawn as proc_spawn
from jobrunner.local.process.cgroup import find_cgroup_root
from jobrunner.local.process.supervisor import (
    FileSpec,
    ProcessSpec,
    kill_orphan_group,
    launch,
    pid_alive,
    resolve_argv,
)

from .conftest import Starter


def test_resolve_argv_prefers_exec_then_entrypoint_plus_cmd() -> None:
    assert resolve_argv(["/bin/run", "x"], ["ignored"], ["ignored"]) == ["/bin/run", "x"]
    assert resolve_argv(None, ["python", "-m"], ["app"]) == ["python", "-m", "app"]
    assert resolve_argv(None, None, ["echo", "hi"]) == ["echo", "hi"]
    assert resolve_argv([], ["ep"], None) == ["ep"]


def test_resolve_argv_without_any_command_says_what_to_set() -> None:
    with pytest.raises(ValueError, match="cannot read the image's own command") as info:
        resolve_argv(None, [], None)
    assert "init.exec" in str(info.value) and "init.cmd" in str(info.value)


async def test_program_not_found_is_exit_127_naming_it(start: Starter) -> None:
    handle, output = await start(["jobrunner-no-such-program", "arg"])
    result = await handle.wait()
    assert (result.exit_code, result.signal) == (127, None)
    assert result.error == "executable not found: 'jobrunner-no-such-program'"
    assert output.records == []


async def test_program_not_executable_is_exit_127(start: Starter, workdir: Path) -> None:
    script = workdir / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    handle, _ = await start([str(script)])
    result = await handle.wait()
    assert result.exit_code == 127
    assert result.error == f"executable not permitted: {str(script)!r} (permission denied)"


async def test_invalid_spec_is_rejected_before_starting(workdir: Path) -> None:
    def spec(**changes: object) -> ProcessSpec:
        fields: dict[str, object] = dict(
            argv=["true"], env={}, files=[], cpus=None, memory_mb=None, workdir=workdir
        )
        fields.update(changes)
        return ProcessSpec(**fields)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="argv is empty"):
        await launch(spec(argv=[]), lambda *a: None)
    with pytest.raises(ValueError, match="cpus must be at least 1"):
        await launch(spec(cpus=0), lambda *a: None)
    with pytest.raises(ValueError, match="memory_mb must be at least 1"):
        await launch(spec(memory_mb=0), lambda *a: None)


async def test_launcher_that_cannot_start_gives_an_error_exit(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fds() -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(proc_spawn, "spawn_launcher", no_fds)
    # Only machines with files go through the launcher.
    files = [FileSpec("/etc/jobrunner-test/a", b"x")]
    spec = ProcessSpec(
        argv=["true"], env={}, files=files, cpus=None, memory_mb=None, workdir=workdir
    )
    handle = await launch(spec, lambda *a: None)
    assert handle.exited
    result = await handle.wait()
    assert result.exit_code == 1
    assert result.error == "cannot start the local launcher: [Errno 24] Too many open files"
    handle.kill()  # no process behind it: must not signal anything


async def test_a_direct_spawn_that_fails_gives_an_error_exit(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fds(*args: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(proc_spawn, "spawn_direct", no_fds)
    spec = ProcessSpec(argv=["true"], env={}, files=[], cpus=None, memory_mb=None, workdir=workdir)
    handle = await launch(spec, lambda *a: None)
    assert handle.exited
    result = await handle.wait()
    assert (result.exit_code, result.error) == (
        1,
        "cannot start the process: [Errno 24] Too many open files",
    )
    handle.kill()


async def test_a_job_inherits_exactly_stdin_stdout_and_stderr(start: Starter) -> None:
    for files in ([], [FileSpec("/etc/jobrunner-test/fds", b"x")]):  # direct and launcher paths
        handle, _ = await start(["sleep", "30"], files=files)
        fds = await _wait_fds(handle.pid)
        assert sorted(int(fd) for fd in fds) == [0, 1, 2], [
            os.readlink(f"/proc/{handle.pid}/fd/{fd}") for fd in fds
        ]
        assert os.readlink(f"/proc/{handle.pid}/fd/0") == "/dev/null"
        for fd in ("1", "2"):
            assert os.readlink(f"/proc/{handle.pid}/fd/{fd}").startswith("pipe:")
        handle.kill()
        await handle.wait()


async def _wait_fds(pid: int) -> list[str]:
    """The fds of `pid` once it runs the job (not the launcher, which still holds its status fd)."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            exe, fds = "", []
        if exe.endswith("sleep"):
            return fds
        assert asyncio.get_running_loop().time() < deadline, f"pid {pid} never ran sleep"
        await asyncio.sleep(0.01)


async def test_pid_alive(start: Starter) -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(0)
    handle, _ = await start(["sleep", "30"])
    assert pid_alive(handle.pid, started_at=handle.started_at)
    assert not pid_alive(handle.pid, started_at=handle.started_at - timedelta(hours=1))
    handle.kill()
    await handle.wait()
    assert not pid_alive(handle.pid)


def _orphan_group() -> tuple[subprocess.Popen[bytes], int]:
    """A session leader with a child, as a crashed server would leave behind."""
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 30 & echo $!; wait"],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert leader.stdout is not None
    child = int(leader.stdout.readline())
    return leader, child


def _gone(pid: int, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_kill_orphan_group_kills_leader_and_children() -> None:
    leader, child = _orphan_group()
    try:
        started = datetime.fromtimestamp(proc_spawn.process_start_time(leader.pid) or 0, UTC)
        kill_orphan_group(leader.pid, started_at=started)
        assert leader.wait(timeout=5) == -signal.SIGKILL
        assert _gone(child)
    finally:
        leader.kill()
        leader.wait()


def test_kill_orphan_group_spares_a_reused_pid() -> None:
    leader, child = _orphan_group()
    try:
        kill_orphan_group(leader.pid, started_at=datetime.now(UTC) - timedelta(days=1))
        time.sleep(0.1)
        assert leader.poll() is None
        assert pid_alive(child)
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()


def test_kill_orphan_group_refuses_nonsense_pids() -> None:
    with pytest.raises(ValueError, match="refusing"):
        kill_orphan_group(1)


def test_kill_orphan_group_reaches_cgroup_members_outside_the_group() -> None:
    root, reason = find_cgroup_root()
    assert root is not None, reason
    cgroup = root.create("orphan-test", 256 * 1024 * 1024)
    leader = subprocess.Popen(
        ["sh", "-c", f"echo $$ > {cgroup.procs_file}; setsid sleep 30 & echo $!; wait"],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert leader.stdout is not None
        escaped = int(leader.stdout.readline())
        kill_orphan_group(leader.pid)
        assert leader.wait(timeout=5) == -signal.SIGKILL
        assert _gone(escaped)
        assert not cgroup.path.exists()
    finally:
        leader.kill()
        leader.wait()
        cgroup.kill_all()
        cgroup.remove()
