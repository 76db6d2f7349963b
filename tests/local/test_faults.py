"""Fault injection: 429s with Retry-After, 5xx, delays, and creates whose answer is lost."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from .local_harness import APP, ServerProcess, command_config, start_server

MACHINES = f"/v1/apps/{APP}/machines"


@pytest.fixture
async def faulty(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the module's server; faults are switched off again afterwards."""
    async with server.client() as client:
        try:
            yield client
        finally:
            reset = await client.post("/_admin/faults", json={})
            assert reset.status_code == 200


async def _set_faults(api: httpx.AsyncClient, **faults: object) -> None:
    response = await api.post("/_admin/faults", json=faults)
    assert response.status_code == 200, response.text


async def test_rate_limit_answers_429_with_retry_after(faulty: httpx.AsyncClient) -> None:
    await _set_faults(faulty, rate_limit=1.0, retry_after=3)
    response = await faulty.get(MACHINES)
    assert response.status_code == 429
    assert response.json() == {"error": "rate limited"}
    assert response.headers["retry-after"] == "3"
    assert (await faulty.get("/healthz")).status_code == 200  # never faulted


async def test_a_share_of_requests_fails(faulty: httpx.AsyncClient) -> None:
    await _set_faults(faulty, rate_limit=0.2, server_error=0.1, seed=7)
    codes = [(await faulty.get(MACHINES)).status_code for _ in range(200)]
    assert 20 <= codes.count(429) <= 60
    assert 5 <= codes.count(503) <= 35
    assert codes.count(200) == 200 - codes.count(429) - codes.count(503)


async def test_server_errors_do_not_act(faulty: httpx.AsyncClient) -> None:
    await _set_faults(faulty, server_error=1.0, server_error_status=502)
    tag = {"attempt": "server-error"}
    response = await faulty.post(MACHINES, json={"config": command_config("true", metadata=tag)})
    assert response.status_code == 502 and "error" in response.json()
    await _set_faults(faulty)
    found = await faulty.get(MACHINES, params={"metadata.attempt": "server-error"})
    assert found.json() == []


async def test_a_dropped_create_still_made_the_machine(faulty: httpx.AsyncClient) -> None:
    await _set_faults(faulty, drop_after_create=1.0)
    config = command_config("true", metadata={"attempt": "dropped"})
    with pytest.raises(httpx.RemoteProtocolError):
        await faulty.post(MACHINES, json={"config": config, "skip_launch": True})
    listed = await faulty.get(MACHINES, params={"metadata.attempt": "dropped"})
    assert listed.status_code == 200  # only creates are dropped
    [machine] = listed.json()
    assert machine["state"] == "created"


async def test_match_limits_faults_to_some_requests(faulty: httpx.AsyncClient) -> None:
    await _set_faults(faulty, rate_limit=1.0, match=r"^POST .*/machines$")
    assert (await faulty.get(MACHINES)).status_code == 200
    assert (await faulty.post(MACHINES, json={})).status_code == 429


async def test_bad_fault_settings_are_400(faulty: httpx.AsyncClient) -> None:
    for body in ({"rate_limit": 2}, {"surprise": 1}, {"seed": "x"}, {"match": "("}, [1]):
        response = await faulty.post("/_admin/faults", json=body)
        assert response.status_code == 400, body


async def test_the_real_clock_cannot_be_moved(faulty: httpx.AsyncClient) -> None:
    response = await faulty.post("/_admin/clock", json={"advance": 60})
    assert response.status_code == 409 and "--fake-clock" in response.json()["error"]


async def test_faults_from_the_environment_and_no_admin(tmp_path: Path) -> None:
    faults = {"rate_limit": 1.0, "match": "^POST ", "seed": 1}
    process = start_server(tmp_path / "state", env={"JOBRUNNER_LOCAL_FAULTS": json.dumps(faults)})
    try:
        async with process.client() as api:
            assert (await api.post(MACHINES, json={})).status_code == 429
            assert (await api.get(MACHINES)).status_code == 200
            assert (await api.post("/_admin/faults", json={})).status_code == 404
    finally:
        process.stop()
    assert "fault injection is on" in process.log()


async def test_delay_slows_every_request_down(faulty: httpx.AsyncClient) -> None:
    await _set_faults(faulty, delay=0.2, seed=5)
    elapsed = []
    for _ in range(8):
        started = time.monotonic()
        assert (await faulty.get(MACHINES)).status_code == 200
        elapsed.append(time.monotonic() - started)
    assert max(elapsed) < 1.0
    assert sum(elapsed) / len(elapsed) > 0.05  # uniform 0..0.2 s: about 0.1 s on average
