"""Volumes: the HTTP endpoints, attachment rules, data kept across machines and server restarts.

Mounting needs a private mount namespace (root on Linux), as config.files do; the tests that run
a machine with a mount are skipped without it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobrunner.local.process.files import ROOT_DIR_NAME
from jobrunner.machines import AsyncMachinesClient
from jobrunner.machines.volumes import VolumeNotFound

from .local_harness import (
    APP,
    ServerProcess,
    command_config,
    create_machine,
    exit_events,
    get_machine,
    reach,
    start_server,
)

VOLUMES = f"/v1/apps/{APP}/volumes"
needs_mounts = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a volume needs a private mount namespace (root)"
)


async def new_volume(api: httpx.AsyncClient, name: str = "data", **body: Any) -> dict[str, Any]:
    response = await api.post(VOLUMES, json={"name": name, **body})
    assert response.status_code == 200, response.text
    volume: dict[str, Any] = response.json()
    return volume


async def get_volume(api: httpx.AsyncClient, volume_id: str) -> dict[str, Any]:
    response = await api.get(f"{VOLUMES}/{volume_id}")
    assert response.status_code == 200, response.text
    volume: dict[str, Any] = response.json()
    return volume


async def logs_of(api: httpx.AsyncClient, machine_id: str) -> list[str]:
    page = await api.get(f"/api/v1/apps/{APP}/logs", params={"instance": machine_id})
    return [entry["attributes"]["message"] for entry in page.json()["data"]]


def mounted(volume_id: str, path: str = "/data") -> list[dict[str, str]]:
    return [{"volume": volume_id, "path": path}]


def host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return fh.read().splitlines()


async def test_volume_lifecycle_over_http(server: ServerProcess, api: httpx.AsyncClient) -> None:
    volume = await new_volume(api, "lifecycle", size_gb=3)
    assert volume["id"].startswith("vol_") and len(volume["id"]) == 20
    assert (volume["name"], volume["size_gb"], volume["state"]) == ("lifecycle", 3, "created")
    assert volume["region"] == "local" and "attached_machine_id" not in volume
    directory = server.state_dir / "volumes" / volume["id"]
    assert directory.is_dir() and (directory.stat().st_mode & 0o777) == 0o700

    listed = (await api.get(VOLUMES)).json()
    assert volume["id"] in [v["id"] for v in listed]
    assert await get_volume(api, volume["id"]) == volume

    url = f"{VOLUMES}/{volume['id']}"
    updated = await api.post(url, json={"snapshot_retention": 10, "auto_backup_enabled": False})
    assert updated.status_code == 200, updated.text
    assert (updated.json()["snapshot_retention"], updated.json()["auto_backup_enabled"]) == (
        10,
        False,
    )

    extended = await api.put(url + "/extend", json={"size_gb": 5})
    assert extended.status_code == 200, extended.text
    assert extended.json()["needs_restart"] is False
    assert extended.json()["volume"]["size_gb"] == 5
    shrink = await api.put(url + "/extend", json={"size_gb": 4})
    assert shrink.status_code == 422 and "size_gb" in shrink.json()["error"]
    missing = await api.put(url + "/extend", json={})
    assert missing.status_code == 400 and "size_gb" in missing.json()["error"]

    assert (await api.get(url + "/snapshots")).json() == []
    (directory / "kept").write_text("in the snapshot")
    made = await api.post(url + "/snapshots")
    assert made.status_code == 200, made.text
    snapshots = (await api.get(url + "/snapshots")).json()
    assert [s["id"] for s in snapshots] == [made.json()["id"]]
    assert snapshots[0]["status"] == "created" and snapshots[0]["size"] == len("in the snapshot")
    restored = await new_volume(api, "restored", snapshot_id=snapshots[0]["id"])
    restored_dir = server.state_dir / "volumes" / restored["id"]
    assert (restored_dir / "kept").read_text() == "in the snapshot"
    forked = await new_volume(api, "forked", source_volume_id=volume["id"])
    assert (server.state_dir / "volumes" / forked["id"] / "kept").exists()

    deleted = await api.delete(url)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["state"] == "destroyed"
    assert (await api.get(url)).status_code == 404
    assert not directory.exists()
    for other in (restored, forked):
        assert (await api.delete(f"{VOLUMES}/{other['id']}")).status_code == 200


async def test_bad_volume_requests_get_4xx_naming_the_field(api: httpx.AsyncClient) -> None:
    for body, field in (
        ({}, "name"),
        ({"name": "Has Spaces"}, "name"),
        ({"name": "ok", "size_gb": 0}, "size_gb"),
        ({"name": "ok", "size_gb": "big"}, "size_gb"),
        ({"name": "ok", "snapshot_id": "vs_nothere"}, "snapshot_id"),
        ({"name": "ok", "source_volume_id": "vol_nothere"}, "source_volume_id"),
    ):
        response = await api.post(VOLUMES, json=body)
        assert response.status_code in (400, 422), (body, response.text)
        assert field in response.json()["error"], (body, response.text)
    assert (await api.get(f"{VOLUMES}/vol_nothere")).status_code == 404
    assert (await api.get("/v1/apps/no-such-app/volumes")).status_code == 404
    wrong = await api.put(VOLUMES)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD, POST"


async def test_a_volume_is_attached_to_one_machine_at_a_time(api: httpx.AsyncClient) -> None:
    volume = await new_volume(api, "exclusive")
    first = await create_machine(
        api, command_config("true", mounts=mounted(volume["id"])), skip_launch=True
    )
    mount = first["config"]["mounts"][0]
    assert (mount["volume"], mount["path"], mount["name"]) == (volume["id"], "/data", "exclusive")
    held = await get_volume(api, volume["id"])
    assert held["attached_machine_id"] == first["id"]
    assert held["attached_alloc_id"] == first["instance_id"]

    second = await api.post(
        f"/v1/apps/{APP}/machines",
        json={"config": command_config("true", mounts=mounted(volume["id"])), "skip_launch": True},
    )
    assert second.status_code == 422
    assert f"already attached to machine {first['id']}" in second.json()["error"]
    refused = await api.delete(f"{VOLUMES}/{volume['id']}")
    assert refused.status_code == 412 and first["id"] in refused.json()["error"]

    two = [{"volume": volume["id"], "path": "/a"}, {"volume": volume["id"], "path": "/b"}]
    too_many = await api.post(
        f"/v1/apps/{APP}/machines", json={"config": command_config("true", mounts=two)}
    )
    assert too_many.status_code == 422 and "one volume" in too_many.json()["error"]
    free = await new_volume(api, "free")
    elsewhere = await api.post(
        f"/v1/apps/{APP}/machines",
        json={"config": command_config("true", mounts=mounted(free["id"])), "region": "ams"},
    )
    assert elsewhere.status_code == 422 and "region" in elsewhere.json()["error"]
    assert (await api.delete(f"{VOLUMES}/{free['id']}")).status_code == 200

    # Updating the machine without the mount frees the volume; with it again takes it back.
    url = f"/v1/apps/{APP}/machines/{first['id']}"
    freed = await api.post(url, json={"config": command_config("true"), "skip_launch": True})
    assert freed.status_code == 200, freed.text
    assert "attached_machine_id" not in await get_volume(api, volume["id"])
    taken = await api.post(
        url,
        json={"config": command_config("true", mounts=mounted(volume["id"])), "skip_launch": True},
    )
    assert taken.status_code == 200, taken.text
    assert (await get_volume(api, volume["id"]))["attached_machine_id"] == first["id"]

    # Destroying the machine detaches the volume; another machine may then take it.
    assert (await api.delete(url)).status_code == 200
    assert "attached_machine_id" not in await get_volume(api, volume["id"])
    third = await create_machine(
        api, command_config("true", mounts=mounted(volume["id"])), skip_launch=True
    )
    assert (await get_volume(api, volume["id"]))["attached_machine_id"] == third["id"]
    await api.delete(f"/v1/apps/{APP}/machines/{third['id']}")
    assert (await api.delete(f"{VOLUMES}/{volume['id']}")).status_code == 200


@needs_mounts
async def test_data_written_by_one_machine_is_read_by_the_next(
    server: ServerProcess, api: httpx.AsyncClient
) -> None:
    volume = await new_volume(api, "shared")
    host_had_data = os.path.exists("/data")
    mounts_before = host_mounts()
    writer = await create_machine(
        api,
        command_config(
            "sh",
            "-c",
            "echo written-by-the-first > /data/x && ls -A "
            f"$PWD/{ROOT_DIR_NAME} | wc -l && touch /etc/jobrunner-volume-test 2>/dev/null; true",
            mounts=mounted(volume["id"]),
            auto_destroy=True,
        ),
    )
    await reach(api, writer["id"], "destroyed", timeout=30)
    assert exit_events(await get_machine(api, writer["id"]))[0]["exit_code"] == 0
    # The process's own root is not visible again inside its workdir.
    assert await logs_of(api, writer["id"]) == ["0"]

    # Only the volume's directory was written on the host.
    directory = server.state_dir / "volumes" / volume["id"]
    assert (directory / "x").read_text() == "written-by-the-first\n"
    assert os.path.exists("/data") == host_had_data
    assert host_mounts() == mounts_before
    assert "attached_machine_id" not in await get_volume(api, volume["id"])

    reader = await create_machine(
        api, command_config("cat", "/data/x", mounts=mounted(volume["id"]), auto_destroy=True)
    )
    await reach(api, reader["id"], "destroyed", timeout=30)
    assert exit_events(await get_machine(api, reader["id"]))[0]["exit_code"] == 0
    assert await logs_of(api, reader["id"]) == ["written-by-the-first"]


@needs_mounts
async def test_mount_paths_below_existing_directories_leave_the_host_alone(
    server: ServerProcess, api: httpx.AsyncClient
) -> None:
    volume = await new_volume(api, "nested")
    existing = server.state_dir.parent / "existing-mount-point"
    existing.mkdir()
    (existing / "host-file").write_text("host")
    missing_below = "/srv/jobrunner-volume-test/deeper"
    assert not os.path.exists("/srv/jobrunner-volume-test")
    for path, check in (
        (str(existing), f"test ! -e {existing}/host-file && echo in > {existing}/f"),
        (missing_below, f"echo in > {missing_below}/g"),
    ):
        machine = await create_machine(
            api,
            command_config(
                "sh", "-c", check, mounts=mounted(volume["id"], path), auto_destroy=True
            ),
        )
        await reach(api, machine["id"], "destroyed", timeout=30)
        assert exit_events(await get_machine(api, machine["id"]))[0]["exit_code"] == 0, (
            await logs_of(api, machine["id"])
        )
    directory = server.state_dir / "volumes" / volume["id"]
    assert sorted(p.name for p in directory.iterdir()) == ["f", "g"]
    assert sorted(p.name for p in existing.iterdir()) == ["host-file"]
    assert not os.path.exists("/srv/jobrunner-volume-test")


@needs_mounts
async def test_volumes_survive_a_server_restart(tmp_path: Path) -> None:
    first = start_server(tmp_path / "state")
    try:
        async with first.client() as api:
            volume = await new_volume(api, "durable", size_gb=2)
            holder = await create_machine(
                api,
                command_config("sh", "-c", "echo kept > /data/kept", mounts=mounted(volume["id"])),
            )
            await reach(api, holder["id"], "stopped", timeout=30)
            before = await get_volume(api, volume["id"])
            assert before["attached_machine_id"] == holder["id"]
    finally:
        first.stop(signal.SIGKILL)  # no clean shutdown: the database alone must hold it

    second = start_server(tmp_path / "state")
    try:
        async with second.client() as api:
            assert await get_volume(api, volume["id"]) == before
            assert [v["id"] for v in (await api.get(VOLUMES)).json()] == [volume["id"]]
            url = f"/v1/apps/{APP}/machines/{holder['id']}"
            assert (await api.delete(url)).status_code == 200
            reader = await create_machine(
                api, command_config("cat", "/data/kept", mounts=mounted(volume["id"]))
            )
            await reach(api, reader["id"], "stopped", timeout=30)
            assert await logs_of(api, reader["id"]) == ["kept"]
    finally:
        second.stop()


async def test_deleting_an_app_deletes_its_volumes(
    server: ServerProcess, api: httpx.AsyncClient
) -> None:
    assert (await api.post("/v1/apps", json={"app_name": "volume-app"})).status_code == 201
    created = await api.post("/v1/apps/volume-app/volumes", json={"name": "gone"})
    volume_id = created.json()["id"]
    assert (await api.delete("/v1/apps/volume-app")).status_code == 202
    assert not (server.state_dir / "volumes" / volume_id).exists()


async def test_the_client_resolves_volume_names_in_mounts(server: ServerProcess) -> None:
    async with AsyncMachinesClient(
        APP, token=server.token, base_url=server.base_url, logs_base_url=server.base_url
    ) as client:
        volume = await client.create_volume("byname")
        machine = await client.create_machine(
            command_config("true", mounts=[{"volume": "byname", "path": "/data"}]),
            skip_launch=True,
        )
        assert machine.config is not None and machine.config.mounts is not None
        assert machine.config.mounts[0]["volume"] == volume.id
        assert (await client.get_volume(volume.id)).attached_machine_id == machine.id
        with pytest.raises(VolumeNotFound) as taken:
            await client.create_machine(
                command_config("true", mounts=[{"volume": "byname", "path": "/data"}])
            )
        assert machine.id in str(taken.value) and "byname" in str(taken.value)
        with pytest.raises(VolumeNotFound) as missing:
            await client.create_machine(
                command_config("true", mounts=[{"volume": "nosuchvolume", "path": "/data"}])
            )
        message = str(missing.value)
        assert (
            "'nosuchvolume' not found" in message and "fly volumes create nosuchvolume" in message
        )
        await client.delete_machine(machine.id, force=True)
        await client.delete_volume(volume.id)
        assert all(v.id != volume.id for v in await client.list_volumes())


async def test_a_snapshot_whose_copy_is_gone_is_a_4xx_not_a_500(
    server: ServerProcess, api: httpx.AsyncClient
) -> None:
    volume = await new_volume(api, "fragile")
    url = f"{VOLUMES}/{volume['id']}"
    snapshot = (await api.post(url + "/snapshots")).json()
    (server.state_dir / "volume-snapshots" / snapshot["id"]).rmdir()  # an empty copy
    response = await api.post(VOLUMES, json={"name": "restore", "snapshot_id": snapshot["id"]})
    assert response.status_code == 422 and "snapshot_id" in response.json()["error"]
    assert [v["name"] for v in (await api.get(VOLUMES)).json()].count("restore") == 0
    assert (await api.delete(url)).status_code == 200
