"""Raw HTTP behaviour of the machine endpoints: shapes, status codes, state transitions."""

from __future__ import annotations

import json
import re
import signal

import httpx

from .local_harness import (
    APP,
    IMAGE,
    ServerProcess,
    command_config,
    create_machine,
    exit_events,
    get_machine,
    machine_pids,
    process_state,
    reach,
    wait_for,
)
from .readiness import READY, wait_ready

ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


async def test_create_answers_a_created_machine_in_fly_shape(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    assert re.fullmatch(r"[0-9a-f]{14}", machine["id"])
    assert re.fullmatch(r"[a-z]+-[a-z]+-\d{4}", machine["name"])
    assert machine["state"] == "created"
    assert machine["region"] == "local"
    assert ULID.match(machine["instance_id"])
    assert machine["private_ip"].startswith("fdaa:")
    assert RFC3339.match(machine["created_at"]) and RFC3339.match(machine["updated_at"])
    assert machine["config"]["image"] == IMAGE
    assert machine["config"]["guest"] == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}
    assert machine["image_ref"]["repository"] == "test" and machine["image_ref"]["tag"] == "1"
    [launch] = machine["events"]
    assert launch["type"] == "launch" and launch["status"] == "created"
    assert launch["source"] == "user" and ULID.match(launch["id"])
    assert isinstance(launch["timestamp"], int) and launch["timestamp"] > 1_600_000_000_000


async def test_machine_boots_and_its_exit_is_recorded_in_both_places(
    api: httpx.AsyncClient,
) -> None:
    machine = await create_machine(api, command_config("sh", "-c", "exit 7"))
    await reach(api, machine["id"], "stopped")
    stopped = await get_machine(api, machine["id"])
    assert stopped["state"] == "stopped"
    assert [e["type"] for e in stopped["events"]] == ["exit", "start", "launch"]
    exit_event = stopped["events"][0]
    assert exit_event["status"] == "stopped"
    details = exit_event["request"]["exit_event"]
    assert details == exit_event["request"]["MonitorEvent"]["exit_event"]
    assert details["exit_code"] == 7
    assert details["requested_stop"] is False and details["restarting"] is False
    assert details["oom_killed"] is False
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", details["exited_at"])
    timestamps = [e["timestamp"] for e in stopped["events"]]
    assert timestamps == sorted(timestamps, reverse=True)


async def test_auto_destroy_goes_to_destroyed_and_stays_readable(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("sh", "-c", "exit 3", auto_destroy=True))
    await reach(api, machine["id"], "destroyed")
    gone = await get_machine(api, machine["id"])
    assert gone["state"] == "destroyed"
    assert [e["type"] for e in gone["events"]][:2] == ["destroy", "exit"]
    assert exit_events(gone)[0]["exit_code"] == 3
    listed = (await api.get(f"/v1/apps/{APP}/machines")).json()
    assert machine["id"] not in [m["id"] for m in listed]
    with_deleted = (await api.get(f"/v1/apps/{APP}/machines?include_deleted=true")).json()
    assert machine["id"] in [m["id"] for m in with_deleted]


async def test_list_filters_by_region_and_metadata(api: httpx.AsyncClient) -> None:
    tagged = await create_machine(
        api, command_config("true", metadata={"run": "r-42"}), skip_launch=True, region="ams"
    )
    await create_machine(api, command_config("true", metadata={"run": "other"}), skip_launch=True)
    by_tag = (await api.get(f"/v1/apps/{APP}/machines", params={"metadata.run": "r-42"})).json()
    assert [m["id"] for m in by_tag] == [tagged["id"]]
    by_region = (await api.get(f"/v1/apps/{APP}/machines", params={"region": "ams"})).json()
    assert [m["id"] for m in by_region] == [tagged["id"]]


async def test_names_are_unique_per_app(api: httpx.AsyncClient) -> None:
    await create_machine(api, command_config("true"), name="only-once", skip_launch=True)
    response = await api.post(
        f"/v1/apps/{APP}/machines",
        json={"config": command_config("true"), "name": "only-once", "skip_launch": True},
    )
    assert response.status_code == 422
    assert response.json() == {
        "error": "Validation failed: Name has already been taken",
        "status": "name_taken",
    }


async def test_update_replaces_the_version_and_boots_the_new_one(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("sleep", "30"))
    await reach(api, machine["id"], "started")
    old_instance = machine["instance_id"]
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    stale = await api.post(
        url, json={"config": command_config("sleep", "31"), "current_version": "01STALE"}
    )
    assert stale.status_code == 412
    assert "current_version" in stale.json()["error"]
    response = await api.post(
        url, json={"config": command_config("sleep", "31"), "current_version": old_instance}
    )
    assert response.status_code == 200, response.text
    updated = response.json()
    assert updated["instance_id"] != old_instance
    assert updated["config"]["init"]["cmd"] == ["sleep", "31"]
    await reach(api, machine["id"], "started", instance_id=updated["instance_id"])
    # the old instance counts as stopped: it was replaced, and can never be started again
    await reach(api, machine["id"], "stopped", instance_id=old_instance, timeout=1)
    never = await wait_for(api, machine["id"], "started", timeout=1, instance_id=old_instance)
    assert never.status_code == 408
    assert never.json()["error"].endswith("currently replaced")
    versions = (await api.get(url + "/versions")).json()
    assert [v["version"] for v in versions] == [updated["instance_id"], old_instance]
    assert versions[1]["user_config"]["init"]["cmd"] == ["sleep", "30"]
    assert (await api.delete(url, params={"force": "true"})).status_code == 200


async def test_update_with_skip_launch_leaves_it_stopped(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("sleep", "30"))
    await reach(api, machine["id"], "started")
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    response = await api.post(url, json={"config": command_config("true"), "skip_launch": True})
    assert response.json()["state"] == "stopped"
    old_exit = exit_events(await get_machine(api, machine["id"]))[0]
    assert old_exit["requested_stop"] is True


async def test_update_cannot_rename(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    response = await api.post(
        f"/v1/apps/{APP}/machines/{machine['id']}",
        json={"config": command_config("true"), "name": "another-name"},
    )
    assert response.status_code == 422 and "name" in response.json()["error"]


async def test_stop_uses_the_signal_and_records_a_requested_stop(api: httpx.AsyncClient) -> None:
    script = f"trap 'echo got-term; exit 42' TERM; {READY}; while true; do sleep 0.05; done"
    machine = await create_machine(api, command_config("sh", "-c", script))
    await wait_ready(api, machine["id"])
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    response = await api.post(url + "/stop", json={"signal": "SIGTERM", "timeout": "5s"})
    assert response.status_code == 200 and response.json() == {"ok": True}
    await reach(api, machine["id"], "stopped", instance_id=machine["instance_id"])
    stopped = await get_machine(api, machine["id"])
    assert [e["type"] for e in stopped["events"]][:2] == ["exit", "stop"]
    details = exit_events(stopped)[0]
    assert details["exit_code"] == 42 and details["requested_stop"] is True


async def test_stop_without_a_body_sends_sigint(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("sleep", "30"))
    await reach(api, machine["id"], "started")
    response = await api.post(f"/v1/apps/{APP}/machines/{machine['id']}/stop")
    assert response.status_code == 200
    await reach(api, machine["id"], "stopped", timeout=5)
    details = exit_events(await get_machine(api, machine["id"]))[0]
    assert details["signal"] == signal.SIGINT and details["exit_code"] == 128 + signal.SIGINT
    assert details["requested_stop"] is True


async def test_stop_escalates_to_sigkill_after_the_timeout(api: httpx.AsyncClient) -> None:
    script = f"trap '' INT TERM; {READY}; sleep 30"
    machine = await create_machine(api, command_config("sh", "-c", script))
    await wait_ready(api, machine["id"])
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    await api.post(url + "/stop", json={"timeout": "200ms"})
    await reach(api, machine["id"], "stopped", timeout=5)
    details = exit_events(await get_machine(api, machine["id"]))[0]
    assert details["signal"] == signal.SIGKILL and details["exit_code"] == 128 + signal.SIGKILL


async def test_stop_config_applies_when_the_body_names_no_signal(api: httpx.AsyncClient) -> None:
    config = command_config(
        "sh", "-c", f"trap 'exit 11' USR1; {READY}; while true; do sleep 0.05; done",
        stop_config={"signal": "SIGUSR1", "timeout": "5s"},
    )  # fmt: skip
    machine = await create_machine(api, config)
    await wait_ready(api, machine["id"])
    await api.post(f"/v1/apps/{APP}/machines/{machine['id']}/stop")
    await reach(api, machine["id"], "stopped")
    assert exit_events(await get_machine(api, machine["id"]))[0]["exit_code"] == 11


async def test_start_after_stop_runs_the_same_instance_again(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true"))
    await reach(api, machine["id"], "stopped")
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    before = (await api.get(url + "/events")).json()[0]["id"]
    response = await api.post(url + "/start")
    assert response.status_code == 200
    assert response.json()["previous_state"] == "stopped"
    await reach(api, machine["id"], "stopped", from_event_id=before)
    again = await get_machine(api, machine["id"])
    assert again["instance_id"] == machine["instance_id"]
    assert [e["type"] for e in again["events"]].count("exit") == 2


async def test_start_while_stopping_is_refused(api: httpx.AsyncClient) -> None:
    machine = await create_machine(
        api, command_config("sh", "-c", f"trap '' INT; {READY}; sleep 30")
    )
    await wait_ready(api, machine["id"])
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    await api.post(url + "/stop", json={"timeout": "3s"})
    response = await api.post(url + "/start")
    assert response.status_code == 412
    assert "stopping" in response.json()["error"]
    await api.delete(url, params={"kill": "true"})


async def test_suspend_pauses_and_start_resumes(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("sleep", "30"))
    await reach(api, machine["id"], "started")
    [pid] = machine_pids(machine["id"])
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    assert (await api.post(url + "/suspend")).json() == {"ok": True}
    await reach(api, machine["id"], "suspended", timeout=2)
    assert process_state(pid) == "T"
    response = await api.post(url + "/start")
    assert response.json()["previous_state"] == "suspended"
    await reach(api, machine["id"], "started", timeout=2)
    assert process_state(pid) != "T"
    assert machine_pids(machine["id"]) == [pid]  # resumed, not restarted
    await api.post(url + "/suspend")
    assert (await api.delete(url, params={"force": "true"})).status_code == 200
    assert (await get_machine(api, machine["id"]))["state"] == "destroyed"
    assert machine_pids(machine["id"]) == []


async def test_restart_runs_the_program_again(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("sleep", "30"))
    await reach(api, machine["id"], "started")
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    before = (await api.get(url + "/events")).json()[0]["id"]
    response = await api.post(url + "/restart", params={"signal": "SIGTERM", "timeout": "2s"})
    assert response.status_code == 200
    await reach(api, machine["id"], "started", from_event_id=before)
    restarted = await get_machine(api, machine["id"])
    details = exit_events(restarted)[0]
    assert details["restarting"] is True and details["requested_stop"] is True
    assert [e["type"] for e in restarted["events"]][:3] == ["start", "exit", "restart"]
    await api.delete(url, params={"force": "true"})


async def test_signal_by_name_and_by_number(api: httpx.AsyncClient) -> None:
    script = f"trap 'echo usr1' USR1; trap 'exit 5' TERM; {READY}; while true; do sleep 0.05; done"
    machine = await create_machine(api, command_config("sh", "-c", script))
    await wait_ready(api, machine["id"])
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    assert (await api.post(url + "/signal", json={"signal": "SIGUSR1"})).status_code == 200
    assert (await api.post(url + "/signal", json={"signal": 15})).status_code == 200
    await reach(api, machine["id"], "stopped")
    details = exit_events(await get_machine(api, machine["id"]))[0]
    assert details["exit_code"] == 5 and details["requested_stop"] is False
    bad = await api.post(url + "/signal", json={"signal": "SIGNOPE"})
    assert bad.status_code in (400, 412)


async def test_delete_refuses_a_running_machine_without_force(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("sleep", "30"))
    await reach(api, machine["id"], "started")
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    refused = await api.delete(url)
    assert refused.status_code == 412
    assert "force=true" in refused.json()["error"]
    assert (await get_machine(api, machine["id"]))["state"] == "started"
    killed = await api.delete(url, params={"kill": "true"})
    assert killed.status_code == 200 and killed.json() == {"ok": True}
    gone = await get_machine(api, machine["id"])
    assert gone["state"] == "destroyed"
    assert exit_events(gone)[0]["signal"] == signal.SIGKILL
    again = await api.delete(url)
    assert again.status_code == 404


async def test_delete_a_stopped_machine_needs_no_force(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    assert (await api.delete(url)).status_code == 200
    response = await wait_for(api, machine["id"], "destroyed", timeout=1)
    assert response.status_code == 200


async def test_metadata_get_set_delete(api: httpx.AsyncClient) -> None:
    machine = await create_machine(
        api, command_config("true", metadata={"a": "1"}), skip_launch=True
    )
    url = f"/v1/apps/{APP}/machines/{machine['id']}/metadata"
    assert (await api.get(url)).json() == {"a": "1"}
    put = await api.post(url + "/b", json={"value": "2"})
    assert put.status_code == 204 and put.content == b""
    assert (await api.get(url)).json() == {"a": "1", "b": "2"}
    assert (await api.delete(url + "/a")).status_code == 204
    assert (await api.get(url)).json() == {"b": "2"}
    assert (await get_machine(api, machine["id"]))["config"]["metadata"] == {"b": "2"}
    bad = await api.post(url + "/c", json={"value": 3})
    assert bad.status_code == 400 and "value" in bad.json()["error"]


async def test_cordon_and_uncordon(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    assert (await api.post(url + "/cordon")).json() == {"ok": True}
    assert (await get_machine(api, machine["id"]))["cordoned"] is True
    assert (await api.post(url + "/uncordon")).json() == {"ok": True}
    assert (await get_machine(api, machine["id"]))["cordoned"] is False


async def test_unknown_app_and_machine_answer_404(api: httpx.AsyncClient) -> None:
    missing_app = await api.get("/v1/apps/no-such-app/machines")
    assert missing_app.status_code == 404 and "app not found" in missing_app.json()["error"]
    missing = await api.get(f"/v1/apps/{APP}/machines/00000000000000")
    assert missing.status_code == 404 and "machine not found" in missing.json()["error"]


async def test_unimplemented_endpoints_answer_404_with_the_fly_body(
    api: httpx.AsyncClient,
) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    for response in (
        await api.post(url + "/exec", json={"cmd": "ls"}),
        await api.get(url + "/ps"),
    ):
        assert response.status_code == 404
        assert set(response.json()) == {"error"}
    wrong_method = await api.put(url)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    # The allow header lists every method of the path, not just the first route's.
    assert wrong_method.headers["allow"] == "GET, HEAD, POST, DELETE"


async def test_the_image_is_recorded_not_pulled_and_the_log_says_so_once(
    server: ServerProcess, api: httpx.AsyncClient
) -> None:
    for _ in range(2):
        machine = await create_machine(api, command_config("true"), skip_launch=True)
        assert machine["config"]["image"] == IMAGE
        assert machine["image_ref"]["registry"] == "registry.example"
    assert server.log().count("does not pull or run it") == 1


async def test_every_request_needs_the_token(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, trust_env=False) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.token}):
            response = await anonymous.get(f"/v1/apps/{APP}/machines", headers=headers)
            assert response.status_code == 401
            assert response.json() == {"error": "Authenticate: token validation error"}
        flyv1 = await anonymous.get(
            f"/v1/apps/{APP}/machines", headers={"Authorization": f"FlyV1 {server.token}"}
        )
        assert flyv1.status_code == 200
        health = await anonymous.get("/healthz")
        assert health.status_code == 200 and health.json()["service"] == "jobrunner-local"
        assert flyv1.headers["fly-request-id"]
    # started without --host: it listens on loopback only
    info = json.loads((server.state_dir / "server.json").read_text())
    assert info["host"] == "127.0.0.1" and server.base_url.startswith("http://127.0.0.1:")
    assert server.token not in server.log()


async def test_apps_list_create_get_delete(api: httpx.AsyncClient) -> None:
    created = await api.post("/v1/apps", json={"app_name": "second-app", "org_slug": "personal"})
    assert created.status_code == 201
    listed = (await api.get("/v1/apps", params={"org_slug": "personal"})).json()
    assert {"second-app", APP} <= {a["name"] for a in listed["apps"]}
    assert listed["total_apps"] == len(listed["apps"])
    app = (await api.get("/v1/apps/second-app")).json()
    assert app["name"] == "second-app" and app["organization"]["slug"] == "personal"
    duplicate = await api.post("/v1/apps", json={"app_name": "second-app"})
    assert duplicate.status_code == 422
    machine = await create_machine(api, command_config("sleep", "30"), app="second-app")
    await reach(api, machine["id"], "started", app="second-app")
    assert (await api.delete("/v1/apps/second-app")).status_code == 202
    assert (await api.get("/v1/apps/second-app")).status_code == 404
    assert (await api.get(f"/v1/apps/second-app/machines/{machine['id']}")).status_code == 404
