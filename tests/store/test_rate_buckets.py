"""Fly's rate limits held by every process sharing a ledger: one bucket per (action, scope) in the
ledger, so several processes take turns instead of each spending its own burst."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anyio

from jobrunner.machines.ratelimit import SharedRateLimiter
from jobrunner.store import SqlLedger, Store


def test_a_bucket_gives_its_burst_then_one_token_per_interval(store: Store) -> None:
    delays = [store.take_rate_token("create:app", 1.0, 3) for _ in range(6)]
    assert delays[:3] == [0.0, 0.0, 0.0]
    # Each later call waits one more interval than the one before (calls already waiting count).
    for n, delay in enumerate(delays[3:], start=1):
        assert n - 0.5 < delay <= n, delays


def test_buckets_are_separate_per_key(store: Store) -> None:
    for _ in range(3):
        store.take_rate_token("create:one", 1.0, 3)
    assert store.take_rate_token("create:two", 1.0, 3) == 0.0
    assert store.take_rate_token("create:one", 1.0, 3) > 0.5


def test_processes_sharing_a_ledger_share_the_limit(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    Store(url).close()  # migrate once
    go = tmp_path / "go"
    code = (
        "import pathlib, sys, time\n"
        "from jobrunner.store import Store\n"
        "s = Store(sys.argv[1])\n"
        "pathlib.Path(sys.argv[3]).touch()\n"
        "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.005)\n"
        "print(' '.join(str(s.take_rate_token('create:app', 1.0, 3)) for _ in range(3)))\n"
    )
    ready = [tmp_path / f"ready{i}" for i in range(3)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, url, str(go), str(flag)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for flag in ready
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        outputs = [p.communicate(timeout=60)[0] for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    delays = sorted(float(d) for out in outputs for d in out.split())
    # Nine calls from three processes at once: one burst of three between them, then one a
    # second (each process alone would have let all of its three go at once).
    assert len(delays) == 9 and delays[:3] == [0.0, 0.0, 0.0], delays
    assert delays[-1] > 4.0, delays


async def test_the_client_side_limiter_sleeps_for_its_turn(store: Store) -> None:
    slept: list[float] = []

    class Clock:
        async def sleep(self, seconds: float) -> None:
            slept.append(seconds)

    limiter = SharedRateLimiter(SqlLedger(store).take_rate_token, Clock())  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(limiter.acquire, "create", "app")
    # Three went at once; two waited, about one and two seconds.
    assert len(slept) == 2 and sorted(round(s) for s in slept) == [1, 2], slept
