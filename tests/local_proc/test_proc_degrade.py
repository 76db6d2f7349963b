"""Without mount namespaces, overlayfs or memory cgroups: clear errors or the fallback, no crash."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jobrunner.local.process import cgroup as proc_cgroup
from jobrunner.local.process import mounts as proc_mounts
from jobrunner.local.process.files import FileToPlace, PlacementError, place_files

from .conftest import Starter, python


def test_no_mount_namespace_is_a_clear_placement_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse() -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(proc_mounts, "unshare_mount_namespace", refuse)
    with pytest.raises(PlacementError) as info:
        place_files([FileToPlace("/etc/jobrunner-test/a.json", b"{}")], str(tmp_path / "stage"))
    message = str(info.value)
    assert message.startswith("cannot place file at '/etc/jobrunner-test/a.json': ")
    assert "mount namespace is unavailable" in message
    assert "root" in message


def test_no_overlayfs_is_a_clear_placement_error(tmp_path: Path) -> None:
    # In a child process: the placement really enters a new mount namespace first.
    script = textwrap.dedent(
        f"""
        import errno
        from jobrunner.local.process import files as proc_files
        from jobrunner.local.process import mounts as proc_mounts
        real_mount = proc_mounts.mount
        def mount(source, target, fstype, flags, data):
            if fstype == "overlay":
                raise OSError(errno.ENODEV, "mount overlay: No such device")
            real_mount(source, target, fstype, flags, data)
        proc_mounts.mount = mount
        try:
            proc_files.place_files(
                [proc_files.FileToPlace("/etc/jobrunner-test/a.json", b"{{}}")],
                "{tmp_path}/stage",
            )
        except proc_files.PlacementError as exc:
            print(exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "cannot place file at '/etc/jobrunner-test/a.json': "
        "cannot overlay '/etc' ([Errno 19] mount overlay: No such device)"
    )


async def test_without_cgroups_memory_limits_fall_back_to_the_watchdog(
    start: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proc_cgroup, "_cached", (None, "no memory cgroup here (test)"))
    began = time.monotonic()
    handle, output = await start(
        python(
            "import time; print(open('/proc/self/cgroup').read()); b = bytearray(400 << 20)\n"
            "time.sleep(10)"
        ),
        memory_mb=256,
    )
    result = await handle.wait()
    assert time.monotonic() - began < 5
    assert (result.oom_killed, result.exit_code) == (True, 137)
    assert "/jobrunner/" not in "\n".join(output.lines())


def test_cgroup_discovery_reports_why_it_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proc_cgroup, "_cached", None)
    monkeypatch.setattr(proc_cgroup, "_mounts", lambda: [])
    root, reason = proc_cgroup.find_cgroup_root()
    assert root is None
    assert reason == "no cgroup v1 memory hierarchy is mounted; no cgroup v2 hierarchy is mounted"


async def test_without_pidfd_exits_are_noticed_by_polling(
    start: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    handle, output = await start(["sh", "-c", "echo polled; exit 4"])
    result = await asyncio.wait_for(handle.wait(), 5)
    assert (result.exit_code, output.lines()) == (4, ["polled"])
