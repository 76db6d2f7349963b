"""Fixtures for the local process supervisor: a machine workdir, an output recorder, `start`.

`start(argv, ...)` launches a process through the real supervisor and makes sure it is gone when
the test ends (killed if still running, then waited for), so no test leaves processes behind.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import pytest

from jobrunner.local.process.supervisor import FileSpec, ProcessHandle, ProcessSpec, launch

PYTHON = sys.executable


class Output:
    """Records every (stream, line, timestamp) the supervisor delivers."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, datetime]] = []

    def __call__(self, stream: str, line: str, at: datetime) -> None:
        self.records.append((stream, line, at))

    def lines(self, stream: str = "stdout") -> list[str]:
        return [line for s, line, _ in self.records if s == stream]

    async def wait_for(self, predicate: Callable[[Output], bool], timeout: float = 5.0) -> None:
        """Wait until `predicate(self)` holds; fail the test after `timeout` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self):
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"output condition not met within {timeout}s; got {self.records!r}")
            await asyncio.sleep(0.01)


class Starter(Protocol):
    def __call__(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        files: list[FileSpec] | None = None,
        cpus: int | None = None,
        memory_mb: int | None = None,
        **launch_options: Any,
    ) -> Awaitable[tuple[ProcessHandle, Output]]: ...


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The machine's private scratch directory."""
    path = tmp_path / "machine"
    path.mkdir()
    return path


@pytest.fixture
async def start(workdir: Path) -> AsyncIterator[Starter]:
    """Launch processes via the supervisor; every one is stopped and reaped at teardown."""
    handles: list[ProcessHandle] = []

    async def _start(
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        files: list[FileSpec] | None = None,
        cpus: int | None = None,
        memory_mb: int | None = None,
        **launch_options: Any,
    ) -> tuple[ProcessHandle, Output]:
        output = Output()
        spec = ProcessSpec(
            argv=argv,
            env=env or {},
            files=files or [],
            cpus=cpus,
            memory_mb=memory_mb,
            workdir=workdir,
            name="test-machine",
        )
        handle = await launch(spec, output, **launch_options)
        handles.append(handle)
        return handle, output

    yield _start
    for handle in handles:
        if not handle.exited:
            handle.kill()
        await asyncio.wait_for(handle.wait(), 10)


def python(code: str) -> list[str]:
    """argv running `code` with this interpreter, unbuffered."""
    return [PYTHON, "-u", "-c", code]


def zombie_children() -> list[int]:
    """Pids of zombie processes whose parent is this test process."""
    zombies = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == b"Z" and int(fields[1]) == os.getpid():
            zombies.append(int(entry))
    return zombies
