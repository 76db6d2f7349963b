"""Machines outlive the API server: a SIGKILLed server's successor re-adopts the running ones and
records the true exits, and the output, of those that ended while no server ran."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from jobrunner.local.daemon import stop_server

from .local_harness import (
    APP,
    ServerProcess,
    command_config,
    create_machine,
    exit_events,
    get_machine,
    machine_pids,
    reach,
    start_server,
)
from .shim_helpers import end_shim, eventually, shim_pids


def _gated(name: str, gates: Path, *steps: str) -> dict[str, Any]:
    """A machine running ``sh`` steps; ``wait X`` blocks until the file ``gates/X`` exists."""
    script = []
    for step in steps:
        if step.startswith("wait "):
            gate = gates / step.removeprefix("wait ")
            script.append(f"while [ ! -e {gate} ]; do sleep 0.02; done")
        else:
            script.append(step)
    return command_config("sh", "-c", "; ".join(script), metadata={"test": name})


async def _messages(api: httpx.AsyncClient, machine_id: str) -> list[str]:
    response = await api.get(
        f"/api/v1/apps/{APP}/logs", params={"instance": machine_id, "next_token": "0"}
    )
    assert response.status_code == 200, response.text
    return [entry["attributes"]["message"] for entry in response.json()["data"]]


def _open(gates: Path, name: str) -> None:
    (gates / name).touch()


async def test_machines_survive_a_killed_server_and_every_exit_is_recorded(
    tmp_path: Path,
) -> None:
    state, gates = tmp_path / "state", tmp_path / "gates"
    gates.mkdir()
    server: ServerProcess | None = start_server(state)
    try:
        assert server is not None
        async with server.client() as api:
            before = await create_machine(api, _gated("before", gates, "echo before", "exit 3"))
            during = await create_machine(
                api,
                _gated("during", gates, "echo during-1", "wait during", "echo during-2", "exit 5"),
            )
            signalled = await create_machine(
                api, _gated("signalled", gates, "echo signalled-1", "exec sleep 600")
            )
            after = await create_machine(
                api,
                _gated(
                    "after", gates,
                    "echo after-1", "wait after-a", "echo after-2", "wait after-b",
                    "echo after-3", "exit 7",
                ),
            )  # fmt: skip
            await reach(api, before["id"], "stopped", timeout=30)
            for machine in (during, signalled, after):
                await reach(api, machine["id"], "started", timeout=30)
            for machine in (during, signalled, after):
                assert eventually(lambda m=machine: _has_pid(m["id"]))
        running = {m["id"]: _leader(m["id"]) for m in (during, signalled, after)}

        server.stop(signal.SIGKILL)  # the crash
        server = None
        killed_at = time.time()
        # While no server runs: one machine ends by itself, one is killed by a signal, one
        # prints and goes on. None of it may be lost.
        _open(gates, "during")
        sleeper = running[signalled["id"]]
        assert eventually(lambda: _runs(sleeper, "sleep"))  # exec'd, so the signal hits sleep
        os.kill(sleeper, signal.SIGTERM)
        _open(gates, "after-a")
        assert eventually(lambda: not machine_pids(during["id"]))
        assert eventually(lambda: not machine_pids(signalled["id"]))
        assert _leader(after["id"]) == running[after["id"]]
        restarted_at = time.time()

        server = start_server(state)
        async with server.client() as api:
            late = await get_machine(api, after["id"])
            assert late["state"] == "started" and exit_events(late) == []
            assert _leader(after["id"]) == running[after["id"]]  # the same process

            first = await get_machine(api, before["id"])
            assert first["state"] == "stopped"
            assert [e["exit_code"] for e in exit_events(first)] == [3]

            ended = await get_machine(api, during["id"])
            assert ended["state"] == "stopped"
            [details] = exit_events(ended)
            assert details["exit_code"] == 5 and details["signal"] == -1
            assert "error" not in details and details["requested_stop"] is False
            exited = _epoch(details["exited_at"])
            assert killed_at - 1 <= exited <= restarted_at + 1

            killed = await get_machine(api, signalled["id"])
            assert killed["state"] == "stopped"
            [details] = exit_events(killed)
            assert details["exit_code"] == 128 + signal.SIGTERM
            assert details["signal"] == signal.SIGTERM

            _open(gates, "after-b")
            await reach(api, after["id"], "stopped", timeout=30)
            [details] = exit_events(await get_machine(api, after["id"]))
            assert details["exit_code"] == 7

            assert await _messages(api, before["id"]) == ["before"]
            assert await _messages(api, during["id"]) == ["during-1", "during-2"]
            assert await _messages(api, signalled["id"]) == ["signalled-1"]
            assert await _messages(api, after["id"]) == ["after-1", "after-2", "after-3"]
    finally:
        if server is not None:
            server.stop()
        for name in ("during", "after-a", "after-b"):
            _open(gates, name)
    assert end_shim(state), "the shim exits by itself once nothing is left to supervise"


async def test_local_stop_leaves_machines_running_unless_asked(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = start_server(state)
    try:
        async with server.client() as api:
            machine = await create_machine(api, command_config("sleep", "600"))
            await reach(api, machine["id"], "started", timeout=30)
        pids = machine_pids(machine["id"])
        assert stop_server(state, timeout=30) is True  # `jobrunner local stop`
        assert server.process.wait(30) is not None
        assert machine_pids(machine["id"]) == pids and shim_pids(state)

        server = start_server(state)
        async with server.client() as api:
            assert (await get_machine(api, machine["id"]))["state"] == "started"
        assert stop_server(state, timeout=30, stop_machines=True) is True
        assert server.process.wait(30) is not None
        assert not machine_pids(machine["id"]) and not shim_pids(state)

        server = start_server(state)
        async with server.client() as api:
            stopped = await get_machine(api, machine["id"])
            assert stopped["state"] == "stopped"
            [details] = exit_events(stopped)
            assert details["requested_stop"] is True and "shut down" in details["error"]
    finally:
        server.stop()
    assert end_shim(state)


def _leader(machine_id: str) -> int:
    """The machine's main process (the leader of its process group)."""
    [leader] = [pid for pid in machine_pids(machine_id) if os.getpgid(pid) == pid]
    return leader


def _has_pid(machine_id: str) -> bool:
    return bool(machine_pids(machine_id))


def _runs(pid: int, program: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe").endswith(program)
    except OSError:
        return False


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


async def test_a_shim_killed_under_a_running_server_is_replaced(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = start_server(state)
    try:
        async with server.client() as api:
            machine = await create_machine(api, command_config("sleep", "600"))
            await reach(api, machine["id"], "started", timeout=30)
            [shim] = shim_pids(state)
            os.kill(shim, signal.SIGKILL)  # nothing can report this machine's exit any more
            await reach(api, machine["id"], "stopped", timeout=30)
            [details] = exit_events(await get_machine(api, machine["id"]))
            assert details["exit_code"] == -1 and "shim" in details["error"]
            assert eventually(lambda: not machine_pids(machine["id"]))  # not left unsupervised

            again = await create_machine(api, command_config("sh", "-c", "echo new shim; exit 4"))
            await reach(api, again["id"], "stopped", timeout=30)
            assert [e["exit_code"] for e in exit_events(await get_machine(api, again["id"]))] == [4]
            assert await _messages(api, again["id"]) == ["new shim"]
            assert shim_pids(state) and shim_pids(state) != [shim]
    finally:
        server.stop()
    assert end_shim(state)
