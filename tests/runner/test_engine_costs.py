"""What a driven run costs: API calls that do not grow with the work in flight, per-runner (not
per-run) ledger bookkeeping, and an outcome recorded before the logs have drained."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx

from jobrunner.machines import AsyncMachinesClient
from jobrunner.runner import Runner
from jobrunner.store import SqlLedger, Store
from tests.runner.conftest import APP, py_job


def count_requests(client: AsyncMachinesClient) -> Counter[str]:
    """Counts the client's HTTP requests as "METHOD /path-shape" (machine ids folded)."""
    seen: Counter[str] = Counter()

    async def hook(request: httpx.Request) -> None:
        parts = request.url.path.split("/")
        if "machines" in parts and len(parts) > parts.index("machines") + 1:
            parts[parts.index("machines") + 1] = "{id}"
        seen[f"{request.method} {'/'.join(parts)}"] += 1

    # The client's pool is private; a request hook is the least intrusive way to watch it.
    client._http.event_hooks["request"].append(hook)
    return seen


class CountingLedger(SqlLedger):
    """A SQL ledger that counts calls by method name."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.calls: Counter[str] = Counter()

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if name.startswith("_") or name in {"calls", "store"} or not callable(attribute):
            return attribute
        calls: Counter[str] = super().__getattribute__("calls")

        def counted(*args: Any, **kwargs: Any) -> Awaitable[Any]:
            calls[name] += 1
            fn: Callable[..., Awaitable[Any]] = attribute
            return fn(*args, **kwargs)

        return counted


def make(
    client: AsyncMachinesClient, ledger: Any, *, grace: float = 0.2, first_wait: float = 1.0
) -> Runner:
    return Runner(
        client,
        ledger,
        backend="local",
        app=APP,
        environ={},
        log_poll_interval=0.05,
        log_drain_grace=grace,
        start_poll=first_wait,
    )


async def test_a_short_run_costs_three_machines_api_calls(
    client: AsyncMachinesClient, store: Store
) -> None:
    requests = count_requests(client)
    # A run that ends within its first wait (long here, so a loaded machine cannot stretch the
    # job past it) needs no look at its start: create, wait, read the exit.
    async with make(client, store, first_wait=30.0) as runner:
        run = await runner.run(py_job("short", "print('quick')"))
    assert run.state == "succeeded"
    machines_api = {k: v for k, v in requests.items() if "/logs" not in k}
    assert machines_api == {
        f"POST /v1/apps/{APP}/machines": 1,
        f"GET /v1/apps/{APP}/machines/{{id}}/wait": 1,
        f"GET /v1/apps/{APP}/machines/{{id}}": 1,
    }, machines_api


async def test_logs_of_many_runs_come_from_one_stream_per_app(
    client: AsyncMachinesClient, store: Store
) -> None:
    requests = count_requests(client)
    async with make(client, store) as runner:
        began = time.monotonic()
        results = []

        async def one(i: int) -> None:
            code = f"import time; print('run {i}', flush=True); time.sleep(2)"
            results.append(await runner.run(py_job(f"many{i}", code)))

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(one, i)
        elapsed = time.monotonic() - began
    assert all(r.state == "succeeded" for r in results)
    for run in results:
        assert [line.message for line in store.get_logs(run.id)] == [f"run {run.job_name[4:]}"]
    logs_requests = sum(v for k, v in requests.items() if k.endswith("/logs"))
    # One poll loop for the app, every 0.05 s, whatever the number of runs (six loops would
    # make six times as many requests).
    assert logs_requests <= elapsed / 0.05 + 20, (logs_requests, elapsed)


async def test_claims_and_cancels_are_looked_after_per_runner_not_per_run(
    client: AsyncMachinesClient, store: Store
) -> None:
    ledger = CountingLedger(store)
    async with make(client, ledger) as runner:
        began = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(runner.run, py_job(f"busy{i}", "import time; time.sleep(3)"))
        elapsed = time.monotonic() - began
    # One query per second for all five runs, not one per run per second.
    assert ledger.calls["cancel_requests"] <= elapsed + 2, (ledger.calls, elapsed)
    assert ledger.calls["get_run"] <= 5 * 6, ledger.calls


async def test_the_outcome_is_recorded_before_the_logs_have_drained(
    client: AsyncMachinesClient, store: Store
) -> None:
    async with make(client, store, grace=3.0) as runner:
        run = await runner.submit(py_job("drain", "print('last words')"))
        finished = await runner.drive(run.id)
        assert finished.state == "succeeded"
        assert finished.owner is None  # the claim is released at once...
        assert runner.logs.busy  # ...while the log lines are still being copied
        await runner.logs_settled(run.id)
        assert not runner.logs.busy
    assert [line.message for line in store.get_logs(run.id)] == ["last words"]
