"""The local backend driven through jobrunner's own Machines client, as the runner drives it."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from jobrunner.machines import (
    AsyncMachinesClient,
    Conflict,
    MachineDestroyed,
    MachinesClient,
    NotFound,
    ValidationFailed,
    WaitTimeout,
)
from jobrunner.machines.errors import MachinesAPIError

from .local_harness import APP, JOBRUNNER_LOCAL, ServerProcess, command_config, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Started with `jobrunner local serve`, the command the issue's "done when" names."""
    state_dir = tmp_path_factory.mktemp("client") / "state"
    process = start_server(state_dir, "--enable-admin", command=JOBRUNNER_LOCAL)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[AsyncMachinesClient]:
    async with AsyncMachinesClient(
        APP, token=server.token, base_url=server.base_url, logs_base_url=server.base_url
    ) as machines:
        yield machines


def one_off(*argv: str, **extra: Any) -> dict[str, Any]:
    return command_config(*argv, auto_destroy=True, **extra)


async def test_a_one_off_job_end_to_end(client: AsyncMachinesClient) -> None:
    """Create `echo hi; exit 3` with auto_destroy, wait for destroyed, read exit code and log."""
    machine = await client.create_machine(one_off("sh", "-c", "echo hi; exit 3"))
    assert machine.state == "created"
    await client.wait(machine.id, "destroyed", timeout=20)
    finished = await client.get_machine(machine.id)
    assert finished.state == "destroyed"
    assert finished.exit_code == 3
    events = await client.list_events(machine.id)
    exits = [e for e in events if e.type == "exit"]
    assert len(exits) == 1 and exits[0].exit_event() is not None
    assert exits[0].exit_event().exit_code == 3  # type: ignore[union-attr]
    page = await client.get_logs(instance=machine.id)
    assert [entry.message for entry in page.entries] == ["hi"]
    assert page.entries[0].instance == machine.id and page.next_token
    assert machine.id not in [m.id for m in await client.list_machines()]
    assert machine.id in [m.id for m in await client.list_machines(include_deleted=True)]


async def test_the_sync_facade_works_too(server: ServerProcess) -> None:
    with MachinesClient(
        APP, token=server.token, base_url=server.base_url, logs_base_url=server.base_url
    ) as machines:
        machine = machines.create_machine(one_off("sh", "-c", "exit 0"))
        machines.wait(machine.id, "destroyed", timeout=20)
        assert machines.get_machine(machine.id).exit_code == 0


async def test_waiting_for_started_after_the_job_is_gone(client: AsyncMachinesClient) -> None:
    machine = await client.create_machine(one_off("true"))
    await client.wait(machine.id, "destroyed", timeout=20)
    with pytest.raises(MachineDestroyed) as gone:
        await client.wait(machine.id, "started", timeout=5)
    assert gone.value.machine.exit_code == 0


async def test_stop_with_instance_wait_and_exit_details(client: AsyncMachinesClient) -> None:
    machine = await client.create_machine(command_config("sleep", "30"))
    await client.wait(machine.id, "started", timeout=20)
    await client.stop_machine(machine.id, signal="SIGTERM", timeout=5)
    await client.wait(machine, "stopped", timeout=20)  # sends its instance_id
    stopped = await client.get_machine(machine.id)
    details = stopped.exit_event()
    assert details is not None and details.requested_stop is True
    assert details.signal == 15
    started = await client.start_machine(machine.id)
    assert started["previous_state"] == "stopped"
    await client.wait(machine.id, "started", timeout=20)
    await client.delete_machine(machine.id, force=True)
    assert (await client.get_machine(machine.id)).state == "destroyed"


async def test_wait_timeout_and_validation_errors(client: AsyncMachinesClient) -> None:
    machine = await client.create_machine(command_config("true"), skip_launch=True)
    with pytest.raises(WaitTimeout):
        await client.wait(machine.id, "started", timeout=1)
    with pytest.raises(ValidationFailed) as invalid:
        await client.create_machine({"init": {"cmd": ["true"]}})  # no image
    assert "config.image" in str(invalid.value)
    with pytest.raises(NotFound):
        await client.get_machine("00000000000000")


async def test_update_restart_signal_and_versions(client: AsyncMachinesClient) -> None:
    machine = await client.create_machine(command_config("sleep", "30"))
    await client.wait(machine.id, "started", timeout=20)
    updated = await client.update_machine(
        machine.id, command_config("sleep", "31"), current_version=machine.instance_id
    )
    assert updated.instance_id != machine.instance_id
    await client.wait(updated, "started", timeout=20)
    with pytest.raises(MachinesAPIError) as stale:
        await client.update_machine(
            machine.id, command_config("sleep", "32"), current_version=machine.instance_id
        )
    assert stale.value.status_code == 412
    before = (await client.list_events(machine.id))[0].id
    await client.restart_machine(machine.id, signal="SIGTERM", timeout=2)
    await client.wait(machine.id, "started", from_event_id=before, timeout=20)
    await client.suspend_machine(machine.id)
    await client.wait(machine.id, "suspended", timeout=20)
    await client.start_machine(machine.id)
    await client.wait(machine.id, "started", timeout=20)
    await client.signal_machine(machine.id, "SIGTERM")
    await client.wait(updated, "stopped", timeout=20)
    exits = [e.exit_event() for e in await client.list_events(machine.id) if e.type == "exit"]
    assert [(x.restarting, x.requested_stop) for x in exits if x] == [
        (False, False),  # the signal: the program's own exit
        (True, True),  # the restart
        (False, True),  # the update replaced the first version
    ]
    await client.delete_machine(machine.id)
    assert (await client.get_machine(machine.id)).state == "destroyed"


async def test_leases_through_the_client(client: AsyncMachinesClient) -> None:
    machine = await client.create_machine(command_config("true"), skip_launch=True)
    lease = await client.acquire_lease(machine.id, ttl=60, description="client test")
    assert lease.ok and lease.data is not None and lease.data.nonce
    nonce = lease.data.nonce
    with pytest.raises(Conflict):
        await client.acquire_lease(machine.id, ttl=60)
    with pytest.raises(Conflict):
        await client.cordon(machine.id)
    refreshed = await client.acquire_lease(machine.id, ttl=90, nonce=nonce)
    assert refreshed.data is not None and refreshed.data.nonce == nonce
    assert (await client.get_lease(machine.id)).data.version == machine.instance_id  # type: ignore[union-attr]
    await client.cordon(machine.id, nonce=nonce)
    await client.uncordon(machine.id, nonce=nonce)
    await client.release_lease(machine.id, nonce)
    with pytest.raises(NotFound):
        await client.get_lease(machine.id)


async def test_metadata_and_listing_by_tag(client: AsyncMachinesClient) -> None:
    machine = await client.create_machine(
        command_config("true", metadata={"run_id": "client-7"}), skip_launch=True
    )
    await client.set_metadata(machine.id, "attempt", "1")
    tags = await client.get_metadata(machine.id)
    assert tags["run_id"] == "client-7" and tags["attempt"] == "1"
    assert "jobrunner_submit_id" in tags  # the client's own duplicate guard
    await client.delete_metadata(machine.id, "attempt")
    assert "attempt" not in await client.get_metadata(machine.id)
    found = await client.list_machines(metadata={"run_id": "client-7"})
    assert [m.id for m in found] == [machine.id]


async def test_apps_through_the_client(client: AsyncMachinesClient) -> None:
    await client.create_app("client-app")
    assert "client-app" in {app.name for app in await client.list_apps()}
    assert (await client.get_app("client-app")).name == "client-app"
    await client.delete_app("client-app")
    with pytest.raises(NotFound):
        await client.get_app("client-app")


async def test_files_and_follow_logs(client: AsyncMachinesClient) -> None:
    script = base64.b64encode(b"echo one\necho two\n").decode()
    files = [{"guest_path": "/opt/job/run.sh", "raw_value": script, "mode": 0o755}]
    machine = await client.create_machine(one_off("sh", "/opt/job/run.sh", files=files))
    await client.wait(machine.id, "destroyed", timeout=20)
    seen = []
    async for entry in client.follow_logs(
        instance=machine.id, poll_interval=0.05, until=lambda: True
    ):
        seen.append(entry.message)
    assert seen == ["one", "two"]


async def test_a_lost_create_answer_does_not_make_a_duplicate(
    client: AsyncMachinesClient, server: ServerProcess
) -> None:
    async with server.client() as admin:
        await admin.post("/_admin/faults", json={"drop_after_create": 1.0, "seed": 3})
        try:
            machine = await client.create_machine(command_config("true"), skip_launch=True)
        finally:
            await admin.post("/_admin/faults", json={})
    submit_id = (machine.config.metadata or {})["jobrunner_submit_id"]  # type: ignore[union-attr]
    same = await client.list_machines(metadata={"jobrunner_submit_id": submit_id})
    assert [m.id for m in same] == [machine.id]
