"""The sync facade mirrors the async client exactly and really works through the portal."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import httpx
import pytest
import respx

from jobrunner.machines import AsyncMachinesClient, MachineDestroyed, MachinesClient, NotFound

from .conftest import APP, FIXED_RETRY, LOGS, MACHINE_ID, MACHINES, TOKEN, FakeClock, load

RENAMED = {"aclose": "close"}


def async_public_methods() -> list[str]:
    names = []
    for name, member in inspect.getmembers(AsyncMachinesClient):
        if name.startswith("_") and name != "__init__":
            continue
        if inspect.iscoroutinefunction(member) or name in ("follow_logs", "from_env", "__init__"):
            names.append(name)
    return names


def test_the_walk_sees_every_endpoint() -> None:
    names = async_public_methods()
    assert len(names) >= 29
    for expected in ("create_machine", "wait", "follow_logs", "get_logs", "acquire_lease"):
        assert expected in names


@pytest.mark.parametrize("name", async_public_methods())
def test_sync_has_the_same_method_and_parameters(name: str) -> None:
    async_sig = inspect.signature(getattr(AsyncMachinesClient, name))
    sync_sig = inspect.signature(getattr(MachinesClient, RENAMED.get(name, name)))
    assert list(sync_sig.parameters.values()) == list(async_sig.parameters.values())
    if name not in ("follow_logs", "from_env", "aclose", "__init__"):
        assert sync_sig.return_annotation == async_sig.return_annotation
    if name != "__init__":
        assert getattr(MachinesClient, RENAMED.get(name, name)).__doc__


@pytest.fixture
def sync_client(router: respx.MockRouter, clock: FakeClock) -> Iterator[MachinesClient]:
    with MachinesClient(
        APP,
        token=TOKEN,
        transport=httpx.MockTransport(router.async_handler),
        retry=FIXED_RETRY,
        clock=clock,
    ) as client:
        yield client


def test_sync_calls_go_through(sync_client: MachinesClient, router: respx.MockRouter) -> None:
    create = router.post(MACHINES).respond(json=load("machine_created"))
    router.get(f"{MACHINES}/{MACHINE_ID}/wait").respond(json={"ok": True})
    router.get(f"{MACHINES}/{MACHINE_ID}").mock(
        side_effect=[httpx.Response(503), httpx.Response(200, json=load("machine_destroyed"))]
    )
    machine = sync_client.create_machine({"image": "alpine"}, region="ord")
    assert machine.state == "created"
    assert create.calls.last.request.headers["authorization"] == f"Bearer {TOKEN}"
    sync_client.wait(machine, "started", timeout=30)
    assert sync_client.get_machine(MACHINE_ID).exit_code == 3  # after one retried 503


def test_sync_errors_are_the_same_exceptions(
    sync_client: MachinesClient, router: respx.MockRouter
) -> None:
    router.get(f"{MACHINES}/{MACHINE_ID}/wait").respond(404, json=load("error_404"))
    router.get(f"{MACHINES}/{MACHINE_ID}").respond(json=load("machine_destroyed"))
    router.delete(f"{MACHINES}/{MACHINE_ID}").respond(404, json=load("error_404"))
    with pytest.raises(MachineDestroyed) as info:
        sync_client.wait(MACHINE_ID, "started")
    assert info.value.machine.exit_code == 3
    with pytest.raises(NotFound):
        sync_client.delete_machine(MACHINE_ID, force=True)


def test_sync_follow_logs(sync_client: MachinesClient, router: respx.MockRouter) -> None:
    router.get(LOGS).mock(
        side_effect=[
            httpx.Response(200, json=load("logs_page_1")),
            httpx.Response(200, json=load("logs_empty")),
        ]
    )
    lines = [e.message for e in sync_client.follow_logs(instance=MACHINE_ID, until=lambda: True)]
    assert lines == ["starting job", "working"]


def test_close_twice_is_fine(router: respx.MockRouter) -> None:
    client = MachinesClient(APP, transport=httpx.MockTransport(router.async_handler))
    client.close()
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.get_machine(MACHINE_ID)
