"""The client-side rate limiter: Fly's per-action limits, per app or machine, on a fake clock."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import respx

from jobrunner.machines.ratelimit import Limit, RateLimiter

from .conftest import API, MACHINE_ID, MACHINES, FakeClock, load, make_client

CONFIG = {"image": "alpine"}


def arrival_times(route: respx.Route, clock: FakeClock, response: httpx.Response) -> list[float]:
    """Make ``route`` note the fake time at which each request arrives."""
    times: list[float] = []

    def note(request: httpx.Request) -> httpx.Response:
        times.append(clock.now)
        return response

    route.mock(side_effect=note)
    return times


async def test_ten_creates_in_a_burst_are_spaced(
    router: respx.MockRouter, clock: FakeClock
) -> None:
    times = arrival_times(
        router.post(MACHINES), clock, httpx.Response(200, json=load("machine_created"))
    )
    async with make_client(router, clock, rate_limit=True) as client:
        await asyncio.gather(*(client.create_machine(CONFIG) for _ in range(10)))
    assert len(times) == 10
    assert sum(1 for t in times if t < 1.0) == 3  # the burst
    assert times == pytest.approx([0, 0, 0, 1, 2, 3, 4, 5, 6, 7])  # then one a second


async def test_sequential_creates_are_spaced_too(
    router: respx.MockRouter, clock: FakeClock
) -> None:
    times = arrival_times(
        router.post(MACHINES), clock, httpx.Response(200, json=load("machine_created"))
    )
    async with make_client(router, clock, rate_limit=True) as client:
        for _ in range(5):
            await client.create_machine(CONFIG)
    assert times == pytest.approx([0, 0, 0, 1, 2])


async def test_get_machine_allows_5_per_second_burst_10(
    router: respx.MockRouter, clock: FakeClock
) -> None:
    times = arrival_times(
        router.get(f"{MACHINES}/{MACHINE_ID}"),
        clock,
        httpx.Response(200, json=load("machine_started")),
    )
    async with make_client(router, clock, rate_limit=True) as client:
        await asyncio.gather(*(client.get_machine(MACHINE_ID) for _ in range(13)))
    assert times == pytest.approx([0] * 10 + [0.2, 0.4, 0.6])


async def test_buckets_are_per_machine_and_per_action(
    router: respx.MockRouter, clock: FakeClock
) -> None:
    router.post(url__regex=rf"{MACHINES}/\w+/(stop|start)").respond(json={"ok": True})
    async with make_client(router, clock, rate_limit=True) as client:
        for machine_id in ("aaa", "bbb", "ccc"):
            for _ in range(3):
                await client.stop_machine(machine_id)
                await client.start_machine(machine_id)
    assert clock.now == 0  # 3 stops + 3 starts per machine fit in each burst


async def test_creates_are_limited_per_app(router: respx.MockRouter, clock: FakeClock) -> None:
    router.post(url__regex=rf"{API}/v1/apps/[\w-]+/machines").respond(json=load("machine_created"))
    async with make_client(router, clock, rate_limit=True) as client:
        for app in ("a1", "a2", "a3"):
            for _ in range(3):
                await client.create_machine(CONFIG, app=app)
    assert clock.now == 0


async def test_wait_is_not_limited(router: respx.MockRouter, clock: FakeClock) -> None:
    router.get(f"{MACHINES}/{MACHINE_ID}/wait").respond(json={"ok": True})
    async with make_client(router, clock, rate_limit=True) as client:
        for _ in range(20):
            await client.wait(MACHINE_ID, "started", timeout=10)
    assert clock.now == 0


async def test_rate_limit_false_sends_at_once(router: respx.MockRouter, clock: FakeClock) -> None:
    router.post(MACHINES).respond(json=load("machine_created"))
    async with make_client(router, clock, rate_limit=False) as client:
        for _ in range(10):
            await client.create_machine(CONFIG)
    assert clock.now == 0


async def test_bucket_refills_while_idle(clock: FakeClock) -> None:
    limiter = RateLimiter(clock)
    for _ in range(3):
        await limiter.acquire("create", "app")
    clock.advance(2.0)  # two tokens come back
    await limiter.acquire("create", "app")
    await limiter.acquire("create", "app")
    assert clock.sleeps == []
    await limiter.acquire("create", "app")
    assert clock.sleeps == pytest.approx([1.0])


async def test_custom_limits(clock: FakeClock) -> None:
    limiter = RateLimiter(clock, limits={"create": Limit(rate=2.0, burst=1)})
    await limiter.acquire("create", "app")
    await limiter.acquire("create", "app")
    assert clock.sleeps == pytest.approx([0.5])
    assert limiter.limit_for("anything-else") == Limit(rate=1.0, burst=3)


async def test_other_reads_keep_to_one_per_second_burst_3(
    router: respx.MockRouter, clock: FakeClock
) -> None:
    # Only "get machine" is documented with 5/s; list, events, metadata, ... are actions at 1/s.
    lists = arrival_times(router.get(MACHINES), clock, httpx.Response(200, json=[]))
    events = arrival_times(
        router.get(f"{MACHINES}/{MACHINE_ID}/events"), clock, httpx.Response(200, json=[])
    )
    async with make_client(router, clock, rate_limit=True) as client:
        await asyncio.gather(*(client.list_machines() for _ in range(5)))
        await asyncio.gather(*(client.list_events(MACHINE_ID) for _ in range(5)))
    assert lists == pytest.approx([0, 0, 0, 1, 2])
    assert events == pytest.approx([2, 2, 2, 3, 4])  # its own bucket, full while lists waited
