"""Leases: acquire (ttl in body or query), refresh, conflicts, release, and guarded actions."""

from __future__ import annotations

import time
from typing import Any

import httpx

from .local_harness import APP, ServerProcess, command_config, create_machine, get_machine, reach


async def _leased(api: httpx.AsyncClient, **body: object) -> tuple[str, dict[str, Any]]:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    response = await api.post(url + "/lease", json=body or {"ttl": 60, "description": "tests"})
    assert response.status_code == 201, response.text
    return url, response.json()


async def test_acquire_answers_the_lease_envelope(api: httpx.AsyncClient) -> None:
    url, lease = await _leased(api)
    assert lease["status"] == "success"
    data = lease["data"]
    assert len(data["nonce"]) == 12
    assert abs(data["expires_at"] - (time.time() + 60)) < 5  # Unix seconds
    assert data["description"] == "tests" and data["owner"]
    machine = (await api.get(url)).json()
    assert data["version"] == machine["instance_id"]
    assert (await api.get(url + "/lease")).json() == lease


async def test_ttl_may_come_in_the_query(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    url = f"/v1/apps/{APP}/machines/{machine['id']}/lease"
    response = await api.post(url, params={"ttl": 5})
    assert response.status_code == 201
    assert abs(response.json()["data"]["expires_at"] - (time.time() + 5)) < 3


async def test_someone_elses_lease_is_a_conflict(server: ServerProcess) -> None:
    async with server.client() as api:
        url, lease = await _leased(api)
        nonce = lease["data"]["nonce"]
        other = await api.post(url + "/lease", json={"ttl": 60})
        assert other.status_code == 409 and "leased" in other.json()["error"]
        refreshed = await api.post(
            url + "/lease", params={"ttl": 120}, headers=server.headers(nonce)
        )
        assert refreshed.status_code == 201
        assert refreshed.json()["data"]["nonce"] == nonce  # refresh keeps the nonce
        assert refreshed.json()["data"]["expires_at"] > lease["data"]["expires_at"]


async def test_guarded_actions_need_the_nonce(server: ServerProcess) -> None:
    async with server.client() as api:
        url, lease = await _leased(api)
        nonce = lease["data"]["nonce"]
        for method, path in (("POST", "/start"), ("POST", "/cordon"), ("DELETE", "")):
            refused = await api.request(method, url + path)
            assert refused.status_code == 409, (path, refused.text)
            assert "fly-machine-lease-nonce" in refused.json()["error"]
        wrong = await api.post(url + "/start", headers=server.headers("000000000000"))
        assert wrong.status_code == 409
        started = await api.post(url + "/start", headers=server.headers(nonce))
        assert started.status_code == 200
        # reading is never guarded
        assert (await api.get(url)).status_code == 200


async def test_release_needs_the_nonce(server: ServerProcess) -> None:
    async with server.client() as api:
        url, lease = await _leased(api)
        nonce = lease["data"]["nonce"]
        assert (await api.delete(url + "/lease")).status_code == 400
        wrong = await api.delete(url + "/lease", headers=server.headers("0" * 12))
        assert wrong.status_code == 409 and "fly-machine-lease-nonce" in wrong.json()["error"]
        released = await api.delete(url + "/lease", headers=server.headers(nonce))
        assert released.status_code == 200
        assert released.json() == {"status": "success", "data": {"ok": True}}
        assert (await api.get(url + "/lease")).status_code == 404
        assert (await api.post(url + "/cordon")).status_code == 200  # no lease any more


async def test_an_expired_lease_frees_the_machine(api: httpx.AsyncClient) -> None:
    url, _ = await _leased(api, ttl=1)
    assert (await api.post(url + "/cordon")).status_code == 409
    time.sleep(1.1)
    assert (await api.get(url + "/lease")).status_code == 404
    assert (await api.post(url + "/cordon")).status_code == 200


async def test_lease_ttl_on_create_returns_the_nonce(server: ServerProcess) -> None:
    async with server.client() as api:
        machine = await create_machine(api, command_config("sleep", "30"), lease_ttl=60)
        assert len(machine["nonce"]) == 12
        url = f"/v1/apps/{APP}/machines/{machine['id']}"
        assert "nonce" not in (await get_machine(api, machine["id"]))
        await reach(api, machine["id"], "started")
        assert (await api.post(url + "/stop")).status_code == 409
        stop = await api.post(url + "/stop", headers=server.headers(machine["nonce"]))
        assert stop.status_code == 200
        await reach(api, machine["id"], "stopped")


async def test_bad_ttl_is_400(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    url = f"/v1/apps/{APP}/machines/{machine['id']}/lease"
    for params, body in (({"ttl": "x"}, None), ({}, {"ttl": "60"}), ({}, {"ttl": 0})):
        response = await api.post(url, params=params, json=body)
        assert response.status_code == 400 and "ttl" in response.json()["error"]
