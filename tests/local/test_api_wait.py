"""The wait endpoint: states, timeouts, instance ids, event ids, and 500 waiters at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from .local_harness import (
    APP,
    ServerProcess,
    command_config,
    create_machine,
    get_machine,
    reach,
    wait_for,
)
from .readiness import READY, wait_ready


async def test_wait_answers_ok_once_started(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("sleep", "30"))
    response = await wait_for(api, machine["id"], "started", timeout=10)
    assert response.status_code == 200 and response.json() == {"ok": True}
    await api.delete(f"/v1/apps/{APP}/machines/{machine['id']}", params={"force": "true"})


async def test_wait_times_out_with_408_and_fly_message(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    started = time.monotonic()
    response = await wait_for(api, machine["id"], "started", timeout=1)
    assert 0.9 <= time.monotonic() - started < 5
    assert response.status_code == 408
    assert response.json() == {
        "error": "machine failed to reach desired state, started, currently created"
    }


@pytest.mark.parametrize("timeout", ["0", "61", "1.5", "soon", "-3"])
async def test_wait_rejects_bad_timeouts(api: httpx.AsyncClient, timeout: str) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    response = await api.get(
        f"/v1/apps/{APP}/machines/{machine['id']}/wait", params={"timeout": timeout}
    )
    assert response.status_code == 400 and "timeout" in response.json()["error"]


async def test_wait_rejects_unknown_states(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    response = await wait_for(api, machine["id"], "exploded", timeout=1)
    assert response.status_code == 400 and "exploded" in response.json()["error"]


async def test_waiting_for_started_on_a_destroyed_machine_is_404(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true", auto_destroy=True))
    await reach(api, machine["id"], "destroyed")
    late = await wait_for(api, machine["id"], "started", timeout=2)
    assert late.status_code == 404
    destroyed = await wait_for(api, machine["id"], "destroyed", timeout=2)
    assert destroyed.status_code == 200
    settled = await wait_for(api, machine["id"], "settled", timeout=2)
    assert settled.status_code == 200


async def test_a_waiter_sees_a_state_the_machine_only_passed_through(
    api: httpx.AsyncClient,
) -> None:
    machine = await create_machine(
        api, command_config("sleep", "0.3", auto_destroy=True), skip_launch=True
    )
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    waiter = asyncio.create_task(wait_for(api, machine["id"], "stopped", timeout=10))
    await asyncio.sleep(0.1)
    await api.post(url + "/start")
    response = await waiter
    assert response.status_code == 200  # stopped on its way to destroyed
    await reach(api, machine["id"], "destroyed")


async def test_several_states_any_of_them(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("sleep", "30"))
    await reach(api, machine["id"], "started")
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    await api.post(url + "/suspend")
    response = await api.get(
        url + "/wait", params=[("state", "stopped"), ("state", "suspended"), ("timeout", 5)]
    )
    assert response.status_code == 200
    # the comma-separated spelling means the same (fly-go repeats the parameter, others join)
    joined = await api.get(url + "/wait", params={"state": "stopped,suspended", "timeout": 5})
    assert joined.status_code == 200
    only_stopped = await api.get(url + "/wait", params={"state": "stopped,destroyed", "timeout": 1})
    assert only_stopped.status_code == 408  # suspended is neither
    await api.delete(url, params={"force": "true"})


async def test_settled_waits_out_transitional_states(api: httpx.AsyncClient) -> None:
    machine = await create_machine(
        api, command_config("sh", "-c", f"trap '' INT; {READY}; sleep 30")
    )
    await wait_ready(api, machine["id"])
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    await api.post(url + "/stop", json={"timeout": "300ms"})
    assert (await get_machine(api, machine["id"]))["state"] == "stopping"
    await reach(api, machine["id"], "settled", timeout=5)
    assert (await get_machine(api, machine["id"]))["state"] == "stopped"


async def test_created_with_skip_launch_counts_as_stopped(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    response = await wait_for(
        api, machine["id"], "stopped", timeout=1, instance_id=machine["instance_id"]
    )
    assert response.status_code == 200


async def test_wait_for_stopped_of_one_instance(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("sleep", "0.2"))
    await reach(api, machine["id"], "stopped", instance_id=machine["instance_id"])
    unknown = await wait_for(api, machine["id"], "stopped", timeout=1, instance_id="01NOPE")
    assert unknown.status_code == 400 and "instance_id" in unknown.json()["error"]
    by_version = await wait_for(api, machine["id"], "stopped", version=machine["instance_id"])
    assert by_version.status_code == 200


async def test_from_event_id_only_counts_later_transitions(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true"))
    await reach(api, machine["id"], "stopped")
    latest = (await api.get(f"/v1/apps/{APP}/machines/{machine['id']}/events")).json()[0]
    response = await wait_for(api, machine["id"], "stopped", timeout=1, from_event_id=latest["id"])
    assert response.status_code == 408
    bad = await wait_for(api, machine["id"], "stopped", timeout=1, from_event_id="nope")
    assert bad.status_code == 400


def _thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


async def test_500_machines_waited_on_at_once_need_no_thread_each(
    server: ServerProcess, api: httpx.AsyncClient
) -> None:
    # 500 different machines, one waiter each: what a runner with 500 jobs in flight does.
    # (Created one after another: that is several times faster than 500 at once through one
    # client's connection pool.)
    machines = [
        await create_machine(api, command_config("true"), skip_launch=True) for _ in range(500)
    ]
    assert len({m["id"] for m in machines}) == 500
    baseline = _thread_count(server.pid)
    limits = httpx.Limits(max_connections=600, max_keepalive_connections=0)
    async with server.client(limits=limits, timeout=60.0) as many:
        waits = [
            asyncio.create_task(
                many.get(
                    f"/v1/apps/{APP}/machines/{machine['id']}/wait",
                    params={"state": "started", "timeout": 2},
                )
            )
            for machine in machines
        ]
        await asyncio.sleep(1.0)  # every request is in flight, held by the server
        during = _thread_count(server.pid)
        answers = await asyncio.gather(*waits)
    assert [a.status_code for a in answers] == [408] * 500
    assert during <= baseline + 4, (baseline, during)
    assert during < 20
