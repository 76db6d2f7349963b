"""Native schedules and retention, on a fake clock moved through the admin endpoint."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from .local_harness import (
    APP,
    ServerProcess,
    command_config,
    create_machine,
    get_machine,
    reach,
    start_server,
)

DAY = 86_400


@pytest.fixture(scope="module")
def clock_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    state = tmp_path_factory.mktemp("scheduled") / "state"
    # No --retention: the purge test checks the default (48 h).
    process = start_server(state, "--enable-admin", "--fake-clock")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def capi(clock_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with clock_server.client() as client:
        yield client


async def _advance(api: httpx.AsyncClient, seconds: float) -> None:
    response = await api.post("/_admin/clock", json={"advance": seconds})
    assert response.status_code == 200, response.text


async def _latest_event(api: httpx.AsyncClient, machine_id: str) -> str:
    events = (await api.get(f"/v1/apps/{APP}/machines/{machine_id}/events")).json()
    return str(events[0]["id"])


async def test_a_daily_machine_runs_about_thirty_times_a_month(capi: httpx.AsyncClient) -> None:
    machine = await create_machine(
        capi, command_config("echo", "tick", schedule="daily"), skip_launch=True
    )
    for _ in range(30):
        before = await _latest_event(capi, machine["id"])
        await _advance(capi, DAY)
        await reach(capi, machine["id"], "stopped", from_event_id=before)
    events = (await capi.get(f"/v1/apps/{APP}/machines/{machine['id']}/events")).json()
    runs = [e for e in events if e["type"] == "start" and e["status"] == "started"]
    assert len(runs) == 30
    spacing = {a["timestamp"] - b["timestamp"] for a, b in itertools.pairwise(runs)}
    assert spacing == {DAY * 1000}  # one run per simulated day, on the fake clock
    sources = {e["source"] for e in events if e["type"] == "start" and e["status"] == "starting"}
    assert sources == {"flyd"}  # started by the schedule, not by a user


async def test_a_fire_that_finds_the_machine_running_is_skipped(capi: httpx.AsyncClient) -> None:
    machine = await create_machine(capi, command_config("sleep", "60", schedule="hourly"))
    await reach(capi, machine["id"], "started")
    await _advance(capi, 3 * 3600)  # three fires due, machine busy: no second start
    await asyncio.sleep(0.2)
    events = (await capi.get(f"/v1/apps/{APP}/machines/{machine['id']}/events")).json()
    assert [e["type"] for e in events].count("start") == 1
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    suspend = await capi.post(url + "/suspend")
    assert suspend.status_code == 412 and "schedule" in suspend.json()["error"]
    await capi.delete(url, params={"force": "true"})


async def test_destroyed_machines_are_purged_after_retention(capi: httpx.AsyncClient) -> None:
    machine = await create_machine(capi, command_config("true", auto_destroy=True))
    await reach(capi, machine["id"], "destroyed")
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    await _advance(capi, 47 * 3600)
    await asyncio.sleep(0.2)
    assert (await get_machine(capi, machine["id"]))["state"] == "destroyed"
    await _advance(capi, 2 * 3600)
    for _ in range(100):
        if (await capi.get(url)).status_code == 404:
            break
        await asyncio.sleep(0.05)
    assert (await capi.get(url)).status_code == 404
    listed = (await capi.get(f"/v1/apps/{APP}/machines", params={"include_deleted": "1"})).json()
    assert machine["id"] not in {m["id"] for m in listed}


async def test_the_clock_only_moves_forward(capi: httpx.AsyncClient) -> None:
    response = await capi.post("/_admin/clock", json={"advance": -5})
    assert response.status_code == 400
