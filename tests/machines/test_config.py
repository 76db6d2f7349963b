"""Configuration from the environment, the auth scheme, and keeping the token out of sight."""

from __future__ import annotations

import logging

import httpx
import pytest
import respx

from jobrunner.errors import ConfigError
from jobrunner.machines import (
    AsyncMachinesClient,
    ClientConfig,
    MachinesClient,
    MachinesError,
    Secret,
)
from jobrunner.machines.config import authorization_header

from .conftest import APP, MACHINE_ID, MACHINES, TOKEN, FakeClock, load, make_client


def test_from_env_defaults() -> None:
    config = ClientConfig.from_env({})
    assert config.token is None
    assert config.base_url == "https://api.machines.dev"
    assert config.logs_base_url == "https://api.fly.io"
    assert config.app is None
    assert config.authorization is None


def test_from_env_reads_every_variable() -> None:
    config = ClientConfig.from_env(
        {
            "FLY_API_TOKEN": "tok",
            "FLY_ACCESS_TOKEN": "other",
            "FLY_API_HOSTNAME": "http://127.0.0.1:4280/v1/",
            "FLY_FLAPS_BASE_URL": "https://ignored.example",
            "FLY_API_BASE_URL": "http://127.0.0.1:9000/",
            "FLY_APP": "my-app",
        }
    )
    assert config.token == Secret("tok")
    assert config.base_url == "http://127.0.0.1:4280"
    assert config.logs_base_url == "http://127.0.0.1:9000"
    assert config.app == "my-app"


def test_from_env_fallbacks() -> None:
    config = ClientConfig.from_env(
        {"FLY_ACCESS_TOKEN": "acc", "FLY_FLAPS_BASE_URL": "https://flaps.example/v1"}
    )
    assert config.token == Secret("acc")
    assert config.base_url == "https://flaps.example"


def test_bad_base_url_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="FLY_API_HOSTNAME"):
        ClientConfig.from_env({"FLY_API_HOSTNAME": "api.machines.dev"})
    with pytest.raises(ConfigError, match="FLY_API_BASE_URL"):
        ClientConfig.from_env({"FLY_API_BASE_URL": "ftp://x"})


@pytest.mark.parametrize(
    ("token", "header"),
    [
        ("abc123", "Bearer abc123"),
        ("FlyV1 fm2_lJPECAAA,fm2_xyz", "FlyV1 fm2_lJPECAAA,fm2_xyz"),
        ("Bearer already", "Bearer already"),
        ("  padded  ", "Bearer padded"),
    ],
)
def test_authorization_scheme(token: str, header: str) -> None:
    assert authorization_header(token) == header


@pytest.mark.parametrize(
    ("token", "header"),
    [(TOKEN, f"Bearer {TOKEN}"), (f"FlyV1 {TOKEN}", f"FlyV1 {TOKEN}")],
)
async def test_client_sends_the_scheme(
    router: respx.MockRouter, clock: FakeClock, token: str, header: str
) -> None:
    route = router.get(f"{MACHINES}/{MACHINE_ID}").respond(json=load("machine_started"))
    async with make_client(router, clock, token=token) as client:
        await client.get_machine(MACHINE_ID)
    assert route.calls.last.request.headers["authorization"] == header


async def test_no_token_sends_no_authorization(router: respx.MockRouter, clock: FakeClock) -> None:
    route = router.get(f"{MACHINES}/{MACHINE_ID}").respond(json=load("machine_started"))
    async with AsyncMachinesClient(
        APP, transport=httpx.MockTransport(router.async_handler), clock=clock
    ) as client:
        await client.get_machine(MACHINE_ID)
    assert "authorization" not in route.calls.last.request.headers


async def test_token_never_in_repr_or_errors(router: respx.MockRouter, clock: FakeClock) -> None:
    config = ClientConfig.from_env({"FLY_API_TOKEN": TOKEN, "FLY_APP": APP})
    assert TOKEN not in repr(config)
    assert TOKEN not in str(config)
    assert TOKEN not in repr(config.token)
    # A server that echoes the token back must not get it into the exception either.
    router.get(f"{MACHINES}/{MACHINE_ID}").respond(401, json={"error": f"bad token {TOKEN}"})
    router.get(f"{MACHINES}/gone").respond(404, text=f"<html>{TOKEN}</html>")
    router.post(f"{MACHINES}/{MACHINE_ID}/signal").mock(side_effect=httpx.ReadError("reset"))
    client = make_client(router, clock, token=TOKEN)
    texts = [repr(client), str(client)]
    for call in (
        client.get_machine(MACHINE_ID),
        client.get_machine("gone"),
        client.signal_machine(MACHINE_ID, "SIGTERM"),
    ):
        with pytest.raises(MachinesError) as info:
            await call
        texts += [str(info.value), repr(info.value), repr(info.value.args)]
    await client.aclose()
    for text in texts:
        assert TOKEN not in text
    assert "FLY_API_TOKEN" in texts[2]


async def test_token_never_in_logs(
    router: respx.MockRouter, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    router.get(f"{MACHINES}/{MACHINE_ID}").mock(
        side_effect=[
            httpx.Response(503, json={"error": f"upstream saw {TOKEN}"}),
            httpx.ReadError("reset"),
            httpx.Response(200, json=load("machine_started")),
        ]
    )
    router.post(MACHINES).mock(
        side_effect=[
            httpx.Response(502, text=TOKEN),
            httpx.Response(200, json=load("machine_created")),
        ]
    )
    router.get(MACHINES).respond(json=[])
    async with make_client(router, clock, token=TOKEN) as client:
        await client.get_machine(MACHINE_ID)
        await client.create_machine({"image": "alpine"})
    assert any("retrying" in r.getMessage() for r in caplog.records)  # the retries were logged
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
    assert TOKEN not in caplog.text


async def test_echoed_token_parts_and_odd_success_bodies_are_blanked(
    router: respx.MockRouter, clock: FakeClock
) -> None:
    macaroons = "fm2_firstmacaroon1,fm2_secondmacaroon2"
    router.get(f"{MACHINES}/{MACHINE_ID}").respond(
        401, json={"error": "bad macaroon fm2_secondmacaroon2"}
    )
    # A long page: the token straddles the 80-character preview cut.
    page = f"<p>{'x' * 60}FlyV1 {macaroons}</p>"
    router.get(f"{MACHINES}/proxied").respond(200, text=page)
    async with make_client(router, clock, token=f"FlyV1 {macaroons}") as client:
        for machine_id in (MACHINE_ID, "proxied"):
            with pytest.raises(MachinesError) as info:
                await client.get_machine(machine_id)
            assert "fm2_" not in str(info.value)  # no macaroon, nor any piece of one


def test_sync_client_repr_hides_token() -> None:
    with MachinesClient(APP, token=TOKEN) as client:
        assert TOKEN not in repr(client)
        assert repr(client).startswith("MachinesClient(")
        assert "token=set" in repr(client)


async def test_missing_app_raises_config_error_naming_fly_app(
    router: respx.MockRouter, clock: FakeClock
) -> None:
    async with AsyncMachinesClient(
        transport=httpx.MockTransport(router.async_handler), clock=clock
    ) as client:
        with pytest.raises(ConfigError, match="FLY_APP"):
            await client.get_machine(MACHINE_ID)
        with pytest.raises(ConfigError, match="FLY_APP"):
            client.follow_logs()
    assert router.calls.call_count == 0


async def test_constructor_arguments_override_config(
    router: respx.MockRouter, clock: FakeClock
) -> None:
    config = ClientConfig.from_env(
        {"FLY_API_TOKEN": "from-env", "FLY_API_HOSTNAME": "https://elsewhere.example"}
    )
    route = router.get(f"{MACHINES}/{MACHINE_ID}").respond(json=load("machine_started"))
    async with AsyncMachinesClient(
        APP,
        token="explicit",
        base_url="https://api.machines.dev/v1",
        config=config,
        transport=httpx.MockTransport(router.async_handler),
        clock=clock,
    ) as client:
        await client.get_machine(MACHINE_ID)
    assert route.calls.last.request.headers["authorization"] == "Bearer explicit"


async def test_from_env(monkeypatch: pytest.MonkeyPatch, router: respx.MockRouter) -> None:
    monkeypatch.setenv("FLY_API_TOKEN", "FlyV1 envtoken")
    monkeypatch.setenv("FLY_APP", "env-app")
    monkeypatch.setenv("FLY_API_HOSTNAME", "http://127.0.0.1:4280")
    route = router.get("http://127.0.0.1:4280/v1/apps/env-app/machines").respond(json=[])
    async with AsyncMachinesClient.from_env(
        transport=httpx.MockTransport(router.async_handler)
    ) as client:
        assert await client.list_machines() == []
    assert route.calls.last.request.headers["authorization"] == "FlyV1 envtoken"


async def test_user_agent(router: respx.MockRouter, clock: FakeClock) -> None:
    route = router.get(f"{MACHINES}/{MACHINE_ID}").respond(json=load("machine_started"))
    async with make_client(router, clock) as client:
        await client.get_machine(MACHINE_ID)
    async with make_client(router, clock, user_agent="mytool/2") as client:
        await client.get_machine(MACHINE_ID)
    assert route.calls[0].request.headers["user-agent"].startswith("jobrunner/")
    assert route.calls[1].request.headers["user-agent"] == "mytool/2"


async def test_cookies_persist_across_calls(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.get(f"{MACHINES}/{MACHINE_ID}").mock(
        side_effect=[
            httpx.Response(
                200,
                json=load("machine_started"),
                headers={"set-cookie": f"fly_flaps_affinity=host42; Path=/v1/apps/{APP}"},
            ),
            httpx.Response(200, json=load("machine_started")),
        ]
    )
    await client.get_machine(MACHINE_ID)
    await client.get_machine(MACHINE_ID)
    assert "cookie" not in route.calls[0].request.headers
    assert route.calls[1].request.headers["cookie"] == "fly_flaps_affinity=host42"
