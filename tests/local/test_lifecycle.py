"""What the machine process sees and what happens when it exits: env, files, restart policies."""

from __future__ import annotations

import base64
import os
import signal
import sys
import uuid

import httpx

from .local_harness import (
    APP,
    command_config,
    create_machine,
    exit_events,
    get_machine,
    machine_pids,
    reach,
    wait_for,
)
from .readiness import READY, wait_ready

LOGS = f"/api/v1/apps/{APP}/logs"


async def _output(api: httpx.AsyncClient, machine_id: str) -> list[str]:
    page = (await api.get(LOGS, params={"instance": machine_id, "next_token": "0"})).json()
    return [entry["attributes"]["message"] for entry in page["data"]]


async def test_environment_has_config_env_and_fly_variables(api: httpx.AsyncClient) -> None:
    script = (
        'echo "$GREETING|$FLY_MACHINE_ID|$FLY_APP_NAME|$FLY_REGION|$FLY_IMAGE_REF'
        '|$FLY_PRIVATE_IP|$FLY_ALLOC_ID"'
    )
    config = command_config("sh", "-c", script, env={"GREETING": "hello"})
    machine = await create_machine(api, config, region="ams")
    await reach(api, machine["id"], "stopped")
    [line] = await _output(api, machine["id"])
    assert line.split("|") == [
        "hello",
        machine["id"],
        APP,
        "ams",
        machine["config"]["image"],
        machine["private_ip"],
        machine["instance_id"],
    ]


async def test_the_environment_is_exactly_config_env_plus_fly_variables(
    api: httpx.AsyncClient,
) -> None:
    # The server itself runs with JOBRUNNER_LOCAL_TOKEN set: none of its variables may leak in.
    machine = await create_machine(api, command_config("env", env={"GREETING": "hello"}))
    await reach(api, machine["id"], "stopped")
    variables = dict(line.split("=", 1) for line in await _output(api, machine["id"]))
    assert set(variables) == {
        "GREETING", "FLY_MACHINE_ID", "FLY_APP_NAME", "FLY_REGION", "FLY_IMAGE_REF",
        "FLY_PRIVATE_IP", "FLY_ALLOC_ID", "FLY_MACHINE_VERSION", "PATH", "HOME",
    }  # fmt: skip
    assert variables["FLY_MACHINE_VERSION"] == machine["instance_id"]


async def test_files_are_placed_at_their_guest_path(api: httpx.AsyncClient) -> None:
    directory = f"/etc/jobrunner-local-test-{uuid.uuid4().hex[:8]}"
    content = base64.b64encode(b"file content\n").decode()
    files = [{"guest_path": f"{directory}/input.txt", "raw_value": content}]
    machine = await create_machine(
        api, command_config("cat", f"{directory}/input.txt", files=files)
    )
    await reach(api, machine["id"], "stopped")
    assert await _output(api, machine["id"]) == ["file content"]
    assert exit_events(await get_machine(api, machine["id"]))[0]["exit_code"] == 0
    assert not os.path.exists(directory)  # only the machine saw it; the host's /etc is untouched


async def test_a_file_that_cannot_be_placed_fails_the_start_naming_its_path(
    api: httpx.AsyncClient,
) -> None:
    guest_path = f"/jobrunner-local-test-{uuid.uuid4().hex[:8]}/x.txt"  # a new top-level dir
    files = [{"guest_path": guest_path, "raw_value": base64.b64encode(b"x").decode()}]
    machine = await create_machine(api, command_config("echo", "must not run", files=files))
    await reach(api, machine["id"], "stopped")
    [details] = exit_events(await get_machine(api, machine["id"]))
    assert details["exit_code"] == 1 and guest_path in details["error"]
    assert await _output(api, machine["id"]) == []
    assert not os.path.exists(os.path.dirname(guest_path))


async def test_guest_cpus_bound_the_cpu_affinity(api: httpx.AsyncClient) -> None:
    guest = {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}
    machine = await create_machine(api, command_config("nproc", guest=guest))
    await reach(api, machine["id"], "stopped")
    assert await _output(api, machine["id"]) == ["1"]


async def test_exceeding_guest_memory_is_an_oom_kill(api: httpx.AsyncClient) -> None:
    allocate = "b = bytearray(400 << 20); import time; time.sleep(10)"
    config = command_config(sys.executable, "-c", allocate, guest={"memory_mb": 256})
    machine = await create_machine(api, config)
    await reach(api, machine["id"], "stopped", timeout=10)
    [details] = exit_events(await get_machine(api, machine["id"]))
    assert details["oom_killed"] is True and details["exit_code"] == 137
    assert details["requested_stop"] is False


async def test_stop_config_timeout_bounds_the_grace_period(api: httpx.AsyncClient) -> None:
    # The program ignores its stop signal; stop_config's 300 ms (not the default 5 s) apply.
    script = f"trap '' USR1; {READY}; while true; do sleep 0.05; done"
    stop_config = {"signal": "SIGUSR1", "timeout": "300ms"}
    machine = await create_machine(api, command_config("sh", "-c", script, stop_config=stop_config))
    await wait_ready(api, machine["id"])
    await api.post(f"/v1/apps/{APP}/machines/{machine['id']}/stop")
    await reach(api, machine["id"], "stopped", timeout=3)
    [details] = exit_events(await get_machine(api, machine["id"]))
    assert details["signal"] == signal.SIGKILL and details["requested_stop"] is True


async def test_a_missing_secret_fails_the_start_naming_it(api: httpx.AsyncClient) -> None:
    files = [{"guest_path": "/run/secret.txt", "secret_name": "DB_PASSWORD"}]
    machine = await create_machine(
        api, command_config("cat", "/run/secret.txt", files=files, auto_destroy=True)
    )
    await reach(api, machine["id"], "destroyed")
    details = exit_events(await get_machine(api, machine["id"]))[0]
    assert "DB_PASSWORD" in details["error"]
    assert "JOBRUNNER_LOCAL_SECRET_DB_PASSWORD" in details["error"]
    assert details["exit_code"] != 0


async def test_a_program_that_does_not_exist_exits_with_an_error(api: httpx.AsyncClient) -> None:
    machine = await create_machine(
        api, command_config("/no/such/program", restart={"policy": "on-failure"})
    )
    await reach(api, machine["id"], "stopped")
    stopped = await get_machine(api, machine["id"])
    [details] = exit_events(stopped)  # no restart loop on a program that cannot start
    assert details["exit_code"] != 0 and details["error"]


async def test_on_failure_retries_up_to_max_retries(api: httpx.AsyncClient) -> None:
    config = command_config(
        "sh", "-c", "exit 4", restart={"policy": "on-failure", "max_retries": 2}
    )
    machine = await create_machine(api, config)
    await reach(api, machine["id"], "stopped", timeout=15)
    details = exit_events(await get_machine(api, machine["id"]))
    assert [d["restarting"] for d in details] == [False, True, True]
    assert all(d["exit_code"] == 4 for d in details)
    restart_counts = [
        e["request"]["restart_count"] for e in (await get_machine(api, machine["id"]))["events"]
        if e["type"] == "exit"
    ]  # fmt: skip
    assert restart_counts == [2, 1, 0]


async def test_on_failure_does_not_restart_after_success(api: httpx.AsyncClient) -> None:
    config = command_config("true", restart={"policy": "on-failure"})
    machine = await create_machine(api, config)
    await reach(api, machine["id"], "stopped")
    assert [d["restarting"] for d in exit_events(await get_machine(api, machine["id"]))] == [False]


async def test_always_restarts_even_after_success(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true", restart={"policy": "always"}))
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    for _ in range(50):
        events = (await api.get(url + "/events")).json()
        if sum(e["type"] == "exit" for e in events) >= 3:
            break
        await reach(api, machine["id"], "started", from_event_id=events[0]["id"])
    details = exit_events(await get_machine(api, machine["id"]))
    assert len(details) >= 3 and all(d["restarting"] for d in details)
    assert all(d["exit_code"] == 0 for d in details)
    await api.post(url + "/stop")
    await reach(api, machine["id"], "stopped")
    exits = len(exit_events(await get_machine(api, machine["id"])))
    late = await wait_for(api, machine["id"], "started", timeout=1)
    assert late.status_code == 408  # a stop ends the restarting for good
    assert len(exit_events(await get_machine(api, machine["id"]))) == exits


async def test_no_policy_with_auto_destroy_runs_once(api: httpx.AsyncClient) -> None:
    config = {"image": "x", "init": {"cmd": ["sh", "-c", "exit 9"]}, "auto_destroy": True}
    machine = await create_machine(api, config)
    await reach(api, machine["id"], "destroyed")
    assert [d["exit_code"] for d in exit_events(await get_machine(api, machine["id"]))] == [9]


async def test_exec_overrides_entrypoint_and_cmd(api: httpx.AsyncClient) -> None:
    config = command_config("echo", "from-cmd")
    config["init"] = {"exec": ["echo", "from-exec"], "entrypoint": ["false"], "cmd": ["x"]}
    machine = await create_machine(api, config)
    await reach(api, machine["id"], "stopped")
    assert await _output(api, machine["id"]) == ["from-exec"]
    config["init"] = {"entrypoint": ["echo", "entry"], "cmd": ["and-cmd"]}
    other = await create_machine(api, config)
    await reach(api, other["id"], "stopped")
    assert await _output(api, other["id"]) == ["entry and-cmd"]


async def test_a_machine_process_inherits_exactly_stdin_stdout_and_stderr(
    api: httpx.AsyncClient,
) -> None:
    # Issue 9: no socket or file of the server or the shim may reach a job.
    machine = await create_machine(api, command_config("sleep", "600"))
    await reach(api, machine["id"], "started", timeout=30)
    [pid] = machine_pids(machine["id"])
    fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
    targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds]
    assert fds == [0, 1, 2], targets
    assert targets[0] == "/dev/null" and all(t.startswith("pipe:") for t in targets[1:])
    stop = await api.post(
        f"/v1/apps/{APP}/machines/{machine['id']}/stop", json={"signal": "SIGKILL"}
    )
    assert stop.status_code == 200
    await reach(api, machine["id"], "stopped", timeout=30)
