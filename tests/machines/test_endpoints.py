"""Every endpoint: method, path, query, headers (auth, lease nonce), body, and the parsed answer."""

from __future__ import annotations

import copy
import traceback

import httpx
import pytest
import respx

from jobrunner.errors import ConfigError
from jobrunner.machines import (
    AsyncMachinesClient,
    Conflict,
    LeaseError,
    MachineConfig,
    MachinesError,
    ValidationFailed,
)
from jobrunner.machines.create import SUBMIT_ID_KEY

from .conftest import API, APP, MACHINE_ID, MACHINES, TOKEN, load, sent_json

M = f"{MACHINES}/{MACHINE_ID}"
NONCE = "5c35f65c9f95"
AUTH = f"Bearer {TOKEN}"


def only_call(route: respx.Route) -> httpx.Request:
    assert route.call_count == 1
    request: httpx.Request = route.calls.last.request
    assert request.headers["authorization"] == AUTH
    return request


def query(request: httpx.Request) -> list[tuple[str, str]]:
    return list(request.url.params.multi_items())


# -- apps ---------------------------------------------------------------------------------


async def test_list_apps_envelope(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.get(f"{API}/v1/apps").respond(json=load("apps"))
    apps = await client.list_apps(org_slug="personal")
    assert query(only_call(route)) == [("org_slug", "personal")]
    assert [a.name for a in apps] == ["test-app", "other-app"]


async def test_list_apps_bare_list(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.get(f"{API}/v1/apps").respond(json=load("apps")["apps"])
    apps = await client.list_apps()
    assert query(only_call(route)) == []
    assert [a.machine_count for a in apps] == [2, 0]


async def test_create_app(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.post(f"{API}/v1/apps").respond(201)
    await client.create_app("new-app", org_slug="personal", network="net1")
    body = sent_json(only_call(route))
    assert body == {"app_name": "new-app", "org_slug": "personal", "network": "net1"}


async def test_create_app_taken_name(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.post(f"{API}/v1/apps").respond(422, json=load("error_422_name_taken"))
    with pytest.raises(ValidationFailed):
        await client.create_app("taken")
    assert route.call_count == 1


async def test_get_app(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.get(f"{API}/v1/apps/{APP}").respond(json=load("app"))
    app = await client.get_app(APP)
    only_call(route)
    assert (app.name, app.status) == (APP, "deployed")


async def test_delete_app(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.delete(f"{API}/v1/apps/{APP}").respond(202)
    await client.delete_app(APP)
    only_call(route)


# -- machines -------------------------------------------------------------------------------


async def test_list_machines_query(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.get(MACHINES).respond(json=load("machines_list"))
    machines = await client.list_machines(
        include_deleted=True, region="ord", metadata={"jobrunner": "true", "run": "r1"}
    )
    assert query(only_call(route)) == [
        ("include_deleted", "true"),
        ("region", "ord"),
        ("metadata.jobrunner", "true"),
        ("metadata.run", "r1"),
    ]
    assert [(m.id, m.state) for m in machines] == [
        (MACHINE_ID, "started"),
        ("e2865013b7d983", "stopped"),
    ]


async def test_list_machines_defaults_send_no_filters(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.get(MACHINES).respond(json=[])
    assert await client.list_machines() == []
    assert query(only_call(route)) == []


async def test_list_machines_other_app(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.get(f"{API}/v1/apps/other-app/machines").respond(json=[])
    await client.list_machines(app="other-app")
    only_call(route)


async def test_create_machine_body(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.post(MACHINES).respond(json=load("machine_created"))
    config = MachineConfig.model_validate(load("machine_created")["config"])
    machine = await client.create_machine(
        config,
        name="job-1",
        region="ord",
        skip_launch=True,
        skip_service_registration=True,
        lease_ttl=30,
    )
    body = sent_json(only_call(route))
    assert body["name"] == "job-1"
    assert body["region"] == "ord"
    assert body["skip_launch"] is True
    assert body["skip_service_registration"] is True
    assert body["lease_ttl"] == 30
    assert body["config"]["image"] == config.image
    assert body["config"]["restart"] == {"policy": "no"}
    assert body["config"]["auto_destroy"] is True
    assert body["config"]["metadata"]["jobrunner"] == "true"
    assert len(body["config"]["metadata"][SUBMIT_ID_KEY]) >= 16
    assert route.calls.last.request.headers["content-type"] == "application/json"
    assert (machine.id, machine.state) == (MACHINE_ID, "created")
    assert config.metadata == {"jobrunner": "true"}  # the caller's object is untouched


async def test_create_machine_from_mapping_keeps_unknown_fields(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.post(MACHINES).respond(json=load("machine_created"))
    await client.create_machine({"image": "alpine", "spot": True})
    body = sent_json(only_call(route))
    assert body["config"]["image"] == "alpine"
    assert body["config"]["spot"] is True
    assert set(body) == {"config"}  # None-valued options are left out


async def test_get_machine(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.get(M).respond(json=load("machine_started"))
    machine = await client.get_machine(MACHINE_ID)
    only_call(route)
    assert machine.instance_id == "01HEPA330HZ37A78TK080NAK1M"
    assert machine.events[0].type == "start"


async def test_update_machine(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.post(M).respond(json=load("machine_started"))
    machine = await client.update_machine(
        MACHINE_ID,
        {"image": "alpine:3.20", "env": {"A": "1"}},
        current_version="01HEPA330HZ37A78TK080NAK1M",
        skip_launch=False,
        nonce=NONCE,
    )
    request = only_call(route)
    assert request.headers["fly-machine-lease-nonce"] == NONCE
    assert sent_json(request) == {
        "config": {"image": "alpine:3.20", "env": {"A": "1"}},
        "current_version": "01HEPA330HZ37A78TK080NAK1M",
        "skip_launch": False,
    }
    assert machine.id == MACHINE_ID


async def test_get_modify_update_keeps_fields_the_client_does_not_know(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    # Config keys (top level and nested) that the API may add after this code was written.
    answer = load("machine_started")
    config = answer["config"]
    config["brand_new_option"] = {"nested": [1, 2], "flag": False}
    config["guest"]["future_knob"] = "x"
    config["init"]["future_flag"] = True
    config["restart"]["future_count"] = 3
    config["files"] = [{"guest_path": "/etc/job.json", "raw_value": "e30=", "future": "y"}]
    config["services"] = [{"internal_port": 8080, "protocol": "tcp", "autostop": "off"}]
    router.get(M).respond(json=answer)
    update = router.post(M).respond(json=answer)

    machine = await client.get_machine(MACHINE_ID)
    assert machine.config is not None
    machine.config.env = {"ADDED": "1"}
    await client.update_machine(machine.id, machine.config, current_version=machine.instance_id)

    expected = copy.deepcopy(config)
    expected["env"] = {"ADDED": "1"}
    sent = sent_json(update.calls.last.request)
    assert sent == {"config": expected, "current_version": machine.instance_id}


@pytest.mark.parametrize(
    ("timeout", "sent"), [(10, "10s"), (10.0, "10s"), (1.5, "1500ms"), ("2m30s", "2m30s")]
)
async def test_stop_machine(
    client: AsyncMachinesClient, router: respx.MockRouter, timeout: float | str, sent: str
) -> None:
    route = router.post(f"{M}/stop").respond(json=load("ok"))
    await client.stop_machine(MACHINE_ID, signal="SIGTERM", timeout=timeout, nonce=NONCE)
    request = only_call(route)
    assert sent_json(request) == {"signal": "SIGTERM", "timeout": sent}
    assert request.headers["fly-machine-lease-nonce"] == NONCE


async def test_stop_machine_without_options_sends_no_body(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.post(f"{M}/stop").respond(json=load("ok"))
    await client.stop_machine(MACHINE_ID)
    request = only_call(route)
    assert request.content == b""
    assert "fly-machine-lease-nonce" not in request.headers


async def test_suspend_machine(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.post(f"{M}/suspend").respond(json=load("ok"))
    await client.suspend_machine(MACHINE_ID, nonce=NONCE)
    assert only_call(route).headers["fly-machine-lease-nonce"] == NONCE


async def test_start_machine(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.post(f"{M}/start").respond(json=load("start"))
    answer = await client.start_machine(MACHINE_ID, nonce=NONCE)
    request = only_call(route)
    assert request.headers["fly-machine-lease-nonce"] == NONCE
    assert request.content == b""
    assert answer == {"previous_state": "stopped", "migrated": False, "new_host": ""}


async def test_restart_machine(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.post(f"{M}/restart").respond(json=load("ok"))
    await client.restart_machine(
        MACHINE_ID, signal="SIGHUP", timeout=5, force_stop=True, nonce=NONCE
    )
    request = only_call(route)
    assert query(request) == [("signal", "SIGHUP"), ("timeout", "5s"), ("force_stop", "true")]
    assert request.headers["fly-machine-lease-nonce"] == NONCE


@pytest.mark.parametrize("signal", ["SIGTERM", 9])
async def test_signal_machine(
    client: AsyncMachinesClient, router: respx.MockRouter, signal: str | int
) -> None:
    route = router.post(f"{M}/signal").respond(json=load("ok"))
    await client.signal_machine(MACHINE_ID, signal, nonce=NONCE)
    request = only_call(route)
    assert sent_json(request) == {"signal": signal}
    assert request.headers["fly-machine-lease-nonce"] == NONCE


@pytest.mark.parametrize(("force", "value"), [(True, "true"), (False, "false")])
async def test_delete_machine_sends_force_and_kill(
    client: AsyncMachinesClient, router: respx.MockRouter, force: bool, value: str
) -> None:
    route = router.delete(M).respond(json=load("ok"))
    await client.delete_machine(MACHINE_ID, force=force, nonce=NONCE)
    request = only_call(route)
    assert query(request) == [("force", value), ("kill", value)]
    assert request.headers["fly-machine-lease-nonce"] == NONCE


async def test_list_events(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.get(f"{M}/events").respond(json=load("events"))
    events = await client.list_events(MACHINE_ID)
    only_call(route)
    assert [e.type for e in events] == ["destroy", "exit", "start", "launch"]
    assert events[1].timestamp == 1699408360456


@pytest.mark.parametrize("action", ["cordon", "uncordon"])
async def test_cordon_uncordon(
    client: AsyncMachinesClient, router: respx.MockRouter, action: str
) -> None:
    route = router.post(f"{M}/{action}").respond(json=load("ok"))
    await getattr(client, action)(MACHINE_ID, nonce=NONCE)
    assert only_call(route).headers["fly-machine-lease-nonce"] == NONCE


# -- leases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201])
async def test_acquire_lease(
    client: AsyncMachinesClient, router: respx.MockRouter, status: int
) -> None:
    route = router.post(f"{M}/lease").respond(status, json=load("lease"))
    lease = await client.acquire_lease(MACHINE_ID, ttl=120, description="jobrunner")
    request = only_call(route)
    assert query(request) == [("ttl", "120")]
    assert sent_json(request) == {"ttl": 120, "description": "jobrunner"}
    assert "fly-machine-lease-nonce" not in request.headers
    assert lease.ok
    assert lease.data is not None
    assert lease.data.nonce == NONCE
    assert lease.data.expires_at == 1708569778


async def test_refresh_lease_keeps_nonce(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.post(f"{M}/lease").respond(json=load("lease"))
    lease = await client.acquire_lease(MACHINE_ID, ttl=13, nonce=NONCE)
    request = only_call(route)
    assert request.headers["fly-machine-lease-nonce"] == NONCE
    assert sent_json(request) == {"ttl": 13}
    assert lease.data is not None and lease.data.nonce == NONCE


async def test_refresh_lease_with_new_nonce_means_lost(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    router.post(f"{M}/lease").respond(json=load("lease"))
    with pytest.raises(LeaseError, match="lost") as info:
        await client.acquire_lease(MACHINE_ID, ttl=13, nonce="an-older-nonce")
    assert isinstance(info.value, MachinesError)
    assert "an-older-nonce" not in str(info.value)


async def test_lease_envelope_not_success_raises(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    router.post(f"{M}/lease").respond(200, json=load("lease_failed"))
    with pytest.raises(LeaseError, match="lease is held by someone else"):
        await client.acquire_lease(MACHINE_ID, ttl=30)


async def test_lease_held_by_someone_else_is_a_conflict(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.post(f"{M}/lease").respond(
        409, json=load("error_409"), headers={"fly-request-id": "req-409"}
    )
    with pytest.raises(Conflict) as info:
        await client.acquire_lease(MACHINE_ID, ttl=30)
    assert route.call_count == 1
    assert "held by hello@fly.io" in str(info.value)
    assert "req-409" in str(info.value)


async def test_get_lease(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.get(f"{M}/lease").respond(json=load("lease"))
    lease = await client.get_lease(MACHINE_ID)
    only_call(route)
    assert lease.data is not None and lease.data.owner == "hello@fly.io"


async def test_release_lease(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.delete(f"{M}/lease").respond(json=load("lease_released"))
    await client.release_lease(MACHINE_ID, NONCE)
    assert only_call(route).headers["fly-machine-lease-nonce"] == NONCE


# -- metadata -------------------------------------------------------------------------------


async def test_get_metadata(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.get(f"{M}/metadata").respond(json=load("metadata"))
    assert await client.get_metadata(MACHINE_ID) == load("metadata")
    only_call(route)


async def test_set_metadata(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.post(f"{M}/metadata/run_id").respond(204)
    await client.set_metadata(MACHINE_ID, "run_id", "r-42", nonce=NONCE)
    request = only_call(route)
    assert sent_json(request) == {"value": "r-42"}
    assert request.headers["fly-machine-lease-nonce"] == NONCE


async def test_delete_metadata_escapes_the_key(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.delete(f"{M}/metadata/a%2Fb").respond(204)
    await client.delete_metadata(MACHINE_ID, "a/b", nonce=NONCE)
    request = only_call(route)
    assert request.url.raw_path == f"/v1/apps/{APP}/machines/{MACHINE_ID}/metadata/a%2Fb".encode()
    assert request.headers["fly-machine-lease-nonce"] == NONCE


# -- answers that are not what they should be ---------------------------------------------


async def test_non_json_success_body_is_a_clear_error(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    router.get(M).respond(200, text="<html>proxy</html>")
    with pytest.raises(MachinesError, match="not JSON"):
        await client.get_machine(MACHINE_ID)


async def test_wrong_shape_names_the_fields_not_the_values(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    router.get(M).respond(json={"id": MACHINE_ID, "config": {"env": {"SECRET": 12345}}})
    with pytest.raises(MachinesError, match="Machine") as info:
        await client.get_machine(MACHINE_ID)
    assert "state" in str(info.value)
    # Not in the message, nor in a chained pydantic error printed with the traceback.
    assert "12345" not in "".join(traceback.format_exception(info.value))


@pytest.mark.parametrize("call", ["create", "update"])
async def test_bad_config_names_the_field_but_never_its_value(
    client: AsyncMachinesClient, router: respx.MockRouter, call: str
) -> None:
    config = {"image": "alpine", "env": {"API_KEY": 98765432}}
    with pytest.raises(ConfigError, match=r"env\.API_KEY.*fix these fields") as info:
        if call == "create":
            await client.create_machine(config)
        else:
            await client.update_machine(MACHINE_ID, config)
    assert "98765432" not in "".join(traceback.format_exception(info.value))
    assert router.calls.call_count == 0


# -- versions, processes, exec ------------------------------------------------------------


async def test_list_versions(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.get(f"{M}/versions").respond(json=load("versions"))
    versions = await client.list_versions(MACHINE_ID)
    only_call(route)
    assert [v.version for v in versions] == [
        "01HEPA330HZ37A78TK080NAK1M",
        "01HEP9ZQ5W6Q7T0V9T1E2K3M4N",
    ]
    assert versions[0].user_config is not None
    assert versions[0].user_config.auto_destroy is True


async def test_list_processes(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    route = router.get(f"{M}/ps").respond(json=load("ps"))
    processes = await client.list_processes(MACHINE_ID, sort_by="cpu", order="desc")
    assert query(only_call(route)) == [("sort_by", "cpu"), ("order", "desc")]
    assert [(p.pid, p.cpu) for p in processes] == [(1, 2), (312, 87)]
    await client.list_processes(MACHINE_ID)
    assert query(route.calls.last.request) == []


async def test_exec_sends_both_forms_and_reads_json(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.post(f"{M}/exec").respond(json=load("exec"))
    result = await client.exec_machine(MACHINE_ID, ["ls", "-la", "/no pe"], timeout=20)
    request = only_call(route)
    assert sent_json(request) == {
        "command": ["ls", "-la", "/no pe"],
        "cmd": "ls -la '/no pe'",
        "timeout": 20,
    }
    # The answer comes only when the command is done, so the read must outlast its timeout.
    assert request.extensions["timeout"]["read"] > 20
    assert (result.exit_code, result.stdout) == (2, "")
    assert "No such file" in result.stderr


async def test_exec_reads_raw_output(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    router.post(f"{M}/exec").respond(
        content=b'{"not": "a result"}\n', headers={"content-type": "application/octet-stream"}
    )
    result = await client.exec_machine(MACHINE_ID, ["cat", "/etc/job.json"])
    assert result.exit_code is None
    assert result.stdout == '{"not": "a result"}\n'


@pytest.mark.parametrize(
    ("command", "timeout", "message"),
    [
        ("ls -la", None, r"list of arguments such as \['ls', '-la'\]"),
        ([], None, "must not be empty"),
        (["ls"], 0, "whole seconds"),
        (["ls"], 2.5, "whole seconds"),
    ],
)
async def test_exec_refuses_bad_arguments_before_sending(
    client: AsyncMachinesClient,
    router: respx.MockRouter,
    command: list[str],
    timeout: int | None,
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        await client.exec_machine(MACHINE_ID, command, timeout=timeout)
    assert router.calls.call_count == 0
