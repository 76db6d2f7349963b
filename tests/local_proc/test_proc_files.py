"""config.files: visible at the guest path to the process only; the host is never written."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobrunner.local.process.files import STAGE_DIR_NAME
from jobrunner.local.process.supervisor import FileSpec

from .conftest import Starter, python

NEW_FILE = "/etc/jobrunner-test/config.json"


def host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return fh.read().splitlines()


async def test_new_path_is_visible_only_to_the_process(start: Starter, workdir: Path) -> None:
    assert not os.path.exists("/etc/jobrunner-test")
    mounts_before = host_mounts()
    handle, output = await start(["cat", NEW_FILE], files=[FileSpec(NEW_FILE, b'{"answer": 42}\n')])
    result = await handle.wait()
    assert (result.exit_code, result.error) == (0, None)
    assert output.lines() == ['{"answer": 42}']
    assert not os.path.exists("/etc/jobrunner-test")
    assert host_mounts() == mounts_before
    assert not (workdir / STAGE_DIR_NAME).exists()


async def test_existing_file_is_covered_and_host_copy_unchanged(start: Starter) -> None:
    original = Path("/etc/hostname").read_bytes()
    handle, output = await start(
        ["cat", "/etc/hostname"], files=[FileSpec("/etc/hostname", b"jobrunner-guest\n")]
    )
    assert (await handle.wait()).exit_code == 0
    assert output.lines() == ["jobrunner-guest"]
    assert Path("/etc/hostname").read_bytes() == original


async def test_mode_is_applied_and_default_is_0644(start: Starter) -> None:
    code = (
        "import os, stat\n"
        "for p in ['/etc/jobrunner-test/secret', '/etc/jobrunner-test/plain', '/etc/hostname']:\n"
        "    print(p, oct(stat.S_IMODE(os.stat(p).st_mode)))\n"
    )
    files = [
        FileSpec("/etc/jobrunner-test/secret", b"s", mode=0o600),
        FileSpec("/etc/jobrunner-test/plain", b"p"),
        FileSpec("/etc/hostname", b"h", mode=0o640),
    ]
    handle, output = await start(python(code), files=files)
    assert (await handle.wait()).exit_code == 0
    assert output.lines() == [
        "/etc/jobrunner-test/secret 0o600",
        "/etc/jobrunner-test/plain 0o644",
        "/etc/hostname 0o640",
    ]


async def test_a_placed_executable_can_be_the_program(start: Starter) -> None:
    script = FileSpec("/usr/local/bin/jobrunner-hello", b"#!/bin/sh\necho hello from $0\n", 0o755)
    handle, output = await start(["jobrunner-hello"], files=[script])
    assert (await handle.wait()).exit_code == 0
    assert output.lines() == ["hello from /usr/local/bin/jobrunner-hello"]
    assert not os.path.exists("/usr/local/bin/jobrunner-hello")


async def test_overlay_on_an_ancestor_of_the_workdir(
    start: Starter, workdir: Path, tmp_path: Path
) -> None:
    # The nearest existing ancestor (tmp_path) also holds the workdir and the private stage.
    guest = tmp_path / "created" / "deep" / "file.txt"
    handle, output = await start(
        ["sh", "-c", f"cat {guest}; echo made > in-workdir; pwd"],
        files=[FileSpec(str(guest), b"inside\n")],
    )
    result = await handle.wait()
    assert (result.exit_code, result.error) == (0, None)
    assert output.lines() == ["inside", str(workdir)]
    assert not (tmp_path / "created").exists()
    # Writes below the overlaid directory stay in the private upper layer too.
    assert not (workdir / "in-workdir").exists()
    assert not (workdir / STAGE_DIR_NAME).exists()


async def test_several_overlays_when_the_first_covers_the_workdir(
    start: Starter, workdir: Path
) -> None:
    # The shallowest overlay is mounted first; here it covers the workdir and so the private
    # stage, which must stay usable for the deeper overlay and the bind mount that follow.
    top = Path("/", workdir.parts[1])
    assert top != Path("/usr")
    first = top / f"jobrunner-test-{os.getpid()}" / "a.txt"
    second = Path("/usr/local/jobrunner-test") / "b.txt"
    files = [
        FileSpec(str(first), b"first\n"),
        FileSpec(str(second), b"second\n"),
        FileSpec("/etc/hostname", b"third\n"),
    ]
    handle, output = await start(["cat", str(first), str(second), "/etc/hostname"], files=files)
    result = await handle.wait()
    assert (result.exit_code, result.error) == (0, None)
    assert output.lines() == ["first", "second", "third"]
    assert not first.parent.exists()
    assert not second.parent.exists()


@pytest.mark.parametrize(
    ("guest_path", "reason"),
    [
        ("/hello.txt", "cannot create new top-level files"),
        ("/jobrunner-new-dir/x.txt", "top-level directories such as '/jobrunner-new-dir'"),
        ("relative/path.txt", "must be an absolute path"),
        ("/etc", "a directory exists at that path"),
        ("/etc/hostname/below", "'/etc/hostname' exists and is not a directory"),
    ],
)
async def test_unplaceable_path_fails_the_start_naming_the_path(
    start: Starter, guest_path: str, reason: str
) -> None:
    handle, output = await start(["echo", "must not run"], files=[FileSpec(guest_path, b"x")])
    result = await handle.wait()
    assert result.exit_code == 1
    assert result.error is not None
    assert result.error.startswith(f"cannot place file at {guest_path!r}: ")
    assert reason in result.error
    assert output.records == []
    assert not os.path.exists("/hello.txt")
    assert not os.path.exists("/jobrunner-new-dir")


def test_mounts_below_the_overlaid_directory_stay_visible(tmp_path: Path) -> None:
    """A directory with a mount below it (like a container's /etc/resolv.conf) keeps that mount.

    Runs in a child process that first enters its own mount namespace, so the tmpfs it mounts
    for the test never appears on the host.
    """
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    script = textwrap.dedent(
        f"""
        import os
        from jobrunner.local.process import mounts as proc_mounts
        from jobrunner.local.process.files import FileToPlace, place_files
        proc_mounts.unshare_mount_namespace()
        proc_mounts.make_rprivate()
        proc_mounts.mount("tmpfs", "{base}/sub", "tmpfs", 0, None)
        with open("{base}/sub/marker", "w") as fh:
            fh.write("still here")
        place_files([FileToPlace("{base}/new/file.txt", b"new")], "{tmp_path}/stage")
        print(open("{base}/sub/marker").read(), open("{base}/new/file.txt").read())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["still", "here", "new"]
    assert not (base / "new").exists()
    assert not (base / "sub" / "marker").exists()
