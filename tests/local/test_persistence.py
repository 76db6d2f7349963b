"""State survives a server restart; processes the server lost are recorded, never forgotten."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from .local_harness import (
    APP,
    command_config,
    create_machine,
    exit_events,
    get_machine,
    machine_pids,
    reach,
    start_server,
)
from .shim_helpers import end_shim, eventually, shim_pids


def _gone(machine_id: str, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not machine_pids(machine_id):
            return True
        time.sleep(0.05)
    return False


async def test_a_crashed_server_leaves_nothing_forgotten(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = start_server(state)
    try:
        async with first.client() as api:
            running = await create_machine(api, command_config("sleep", "60"))
            one_off = await create_machine(api, command_config("sleep", "60", auto_destroy=True))
            done = await create_machine(
                api, command_config("sh", "-c", "echo kept; exit 2", metadata={"k": "v"})
            )
            leased = await create_machine(api, command_config("true"), skip_launch=True)
            for machine in (running, one_off):
                await reach(api, machine["id"], "started")
            await reach(api, done["id"], "stopped")
            tag = f"/v1/apps/{APP}/machines/{done['id']}/metadata/added"
            assert (await api.post(tag, json={"value": "later"})).status_code == 204
            url = f"/v1/apps/{APP}/machines/{leased['id']}/lease"
            lease = (await api.post(url, json={"ttl": 600})).json()
            await api.post("/v1/apps", json={"app_name": "kept-app"})
    finally:
        first.stop(signal.SIGKILL)  # a crash: no clean shutdown at all
    survivors = machine_pids(running["id"])
    assert survivors, "the machine's process outlives a crashed server"

    second = start_server(state)
    try:
        async with second.client() as api:
            # Re-adopted, as on Fly: still started, same process.
            adopted = await get_machine(api, running["id"])
            assert adopted["state"] == "started"
            assert exit_events(adopted) == []
            assert machine_pids(running["id"]) == survivors
            assert (await get_machine(api, one_off["id"]))["state"] == "started"
            kept = await get_machine(api, done["id"])
            assert exit_events(kept)[0]["exit_code"] == 2
            assert kept["config"]["metadata"] == {"k": "v", "added": "later"}
            assert [e["type"] for e in kept["events"]] == ["exit", "start", "launch"]
            assert (await api.get(url)).json() == lease
            assert (await api.get("/v1/apps/kept-app")).status_code == 200
            logs = await api.get(
                f"/api/v1/apps/{APP}/logs", params={"instance": done["id"], "next_token": "0"}
            )
            assert [e["attributes"]["message"] for e in logs.json()["data"]] == ["kept"]
            # The adopted process is still under control: stop it through the API.
            stop = await api.post(f"/v1/apps/{APP}/machines/{running['id']}/stop")
            assert stop.status_code == 200
            await reach(api, running["id"], "stopped")
            [details] = exit_events(await get_machine(api, running["id"]))
            assert details["requested_stop"] is True and details["signal"] == signal.SIGINT
            again = await api.post(f"/v1/apps/{APP}/machines/{running['id']}/start")
            assert again.status_code == 200
            await reach(api, running["id"], "started")
    finally:
        assert second.stop() is not None  # SIGTERM: stops the machines, then the shim goes
    assert _gone(running["id"]) and _gone(one_off["id"])
    assert end_shim(state)


async def test_a_crash_of_server_and_shim_is_recorded_as_lost(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = start_server(state)
    try:
        async with first.client() as api:
            running = await create_machine(api, command_config("sleep", "60"))
            one_off = await create_machine(api, command_config("sleep", "60", auto_destroy=True))
            for machine in (running, one_off):
                await reach(api, machine["id"], "started")
    finally:
        first.stop(signal.SIGKILL)
        for pid in shim_pids(state):
            os.kill(pid, signal.SIGKILL)  # nothing is left that knows how the processes end
    assert eventually(lambda: not shim_pids(state))
    assert machine_pids(running["id"]), "orphaned when the shim died"

    second = start_server(state)
    try:
        async with second.client() as api:
            assert _gone(running["id"]) and _gone(one_off["id"])  # nobody could supervise them
            lost = await get_machine(api, running["id"])
            assert lost["state"] == "stopped"
            details = exit_events(lost)[0]
            assert details["exit_code"] == -1
            assert details["error"] == "local backend restarted while the machine was running"
            assert (await get_machine(api, one_off["id"]))["state"] == "destroyed"
            again = await api.post(f"/v1/apps/{APP}/machines/{running['id']}/start")
            assert again.status_code == 200
            await reach(api, running["id"], "started")
    finally:
        assert second.stop() is not None
    assert _gone(running["id"])
    assert end_shim(state)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
async def test_a_clean_shutdown_stops_machines_and_says_so(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    first = start_server(tmp_path / "state")
    try:
        async with first.client() as api:
            machine = await create_machine(api, command_config("sleep", "60"))
            await reach(api, machine["id"], "started")
    finally:
        first.stop(stop_signal)
    assert _gone(machine["id"], within=0.5)
    assert not (tmp_path / "state" / "server.json").exists()
    second = start_server(tmp_path / "state")
    try:
        async with second.client() as api:
            stopped = await get_machine(api, machine["id"])
            assert stopped["state"] == "stopped"
            details = exit_events(stopped)[0]
            assert details["requested_stop"] is True
            assert details["signal"] == signal.SIGINT  # Fly's default stop signal
            assert "shut down" in details["error"]
            assert len(exit_events(stopped)) == 1
    finally:
        second.stop()
    assert end_shim(tmp_path / "state")


def test_two_servers_cannot_share_a_state_dir(tmp_path: Path) -> None:
    first = start_server(tmp_path / "state")
    try:
        try:
            start_server(tmp_path / "state", timeout=10)
        except RuntimeError as exc:
            assert "already uses state dir" in str(exc)
        else:
            raise AssertionError("a second server started on the same state dir")
    finally:
        first.stop()
    assert end_shim(tmp_path / "state")
