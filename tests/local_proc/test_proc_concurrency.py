"""Hundreds of processes at once: no thread per process, every exit and line accounted for."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from jobrunner.local.process.supervisor import ProcessSpec, launch

from .conftest import Output, zombie_children

COUNT = 200


async def test_200_concurrent_short_processes(workdir: Path) -> None:
    baseline = threading.active_count()
    peak = baseline
    outputs = [Output() for _ in range(COUNT)]

    async def one(index: int) -> tuple[int, int]:
        nonlocal peak
        spec = ProcessSpec(
            argv=["sh", "-c", 'echo "job $0"; echo "err $0" >&2; exit $(($0 % 5))', str(index)],
            env={},
            files=[],
            cpus=None,
            memory_mb=None,
            workdir=workdir,
            name=f"m{index}",
        )
        handle = await launch(spec, outputs[index])
        peak = max(peak, threading.active_count())
        result = await handle.wait()
        peak = max(peak, threading.active_count())
        return index, result.exit_code

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(COUNT))), 60)
    assert peak <= baseline + 1
    assert results == [(i, i % 5) for i in range(COUNT)]
    for i, output in enumerate(outputs):
        assert output.lines("stdout") == [f"job {i}"]
        assert output.lines("stderr") == [f"err {i}"]
    assert zombie_children() == []
