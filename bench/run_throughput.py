"""How fast the runner pushes short jobs through the local backend, and what it costs.

    python bench/run_throughput.py [--runs 50] [--concurrency 10] [--database sqlite|postgres]

Starts a private local backend (any free port, a temporary JOBRUNNER_HOME), runs ``--runs``
trivial jobs with at most ``--concurrency`` at once through one Runner, and prints wall time,
runs per second, the median and p95 latency from submit to recorded outcome, and this process's
peak thread count and RSS. Numbers go into docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio

from jobrunner.local.daemon import ensure_running, stop_server
from jobrunner.machines import AsyncMachinesClient
from jobrunner.runner import Runner
from jobrunner.spec import Job
from jobrunner.store import Store


async def bench(runs: int, concurrency: int, database_url: str, home: Path) -> None:
    state_dir = home / "local"
    endpoint = ensure_running(state_dir, port=0)
    store = Store(database_url)
    job = Job(name="bench", image="python:3.12-slim", cmd=["/bin/sh", "-c", "echo hi"])
    latencies: list[float] = []
    peak_threads = threading.active_count()
    limiter = anyio.Semaphore(concurrency)
    try:
        async with AsyncMachinesClient(
            "jobrunner-local",
            token=endpoint.token,
            base_url=endpoint.base_url,
            logs_base_url=endpoint.base_url,
            rate_limit=False,
        ) as client:
            runner = Runner(
                client, store, backend="local", app="jobrunner-local",
                log_poll_interval=0.1, log_drain_grace=0.1,
            )  # fmt: skip

            async def one() -> None:
                nonlocal peak_threads
                async with limiter:
                    began = time.perf_counter()
                    run = await runner.run(job)
                    latencies.append(time.perf_counter() - began)
                    peak_threads = max(peak_threads, threading.active_count())
                    assert run.state == "succeeded", run

            began = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(runs):
                    tg.start_soon(one)
            wall = time.perf_counter() - began
    finally:
        store.close()
        stop_server(state_dir)
    latencies.sort()
    p95 = latencies[max(0, int(len(latencies) * 0.95) - 1)]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"runs={runs} concurrency={concurrency} database={database_url.split(':')[0]}")
    print(f"wall={wall:.2f}s throughput={runs / wall:.1f} runs/s")
    print(f"latency median={statistics.median(latencies) * 1000:.0f}ms p95={p95 * 1000:.0f}ms")
    print(f"peak_threads={peak_threads} peak_rss={rss_mb:.0f}MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.database == "sqlite":
            anyio.run(bench, args.runs, args.concurrency, f"sqlite:///{tmp}/bench.db", Path(tmp))
        else:
            with scratch_postgres() as url:
                anyio.run(bench, args.runs, args.concurrency, url, Path(tmp))
    sys.exit(0)


@contextlib.contextmanager
def scratch_postgres() -> Iterator[str]:
    """A throwaway database on the local PostgreSQL (127.0.0.1:5432, trust auth)."""
    import psycopg

    name = f"jobrunner_bench_{os.getpid()}"
    admin_url = "postgresql://postgres@127.0.0.1:5432/test"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
