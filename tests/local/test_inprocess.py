"""The ASGI app in-process: the last-resort 500 handler, the default app, the settings repr."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from jobrunner.local.api.app import build_app
from jobrunner.local.backend import LocalBackend
from jobrunner.local.settings import ServerSettings

TOKEN = "in-process-token"


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(ServerSettings(state_dir=tmp_path / "state", token=TOKEN))


@pytest.fixture
async def client(backend: LocalBackend) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(backend)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        backend.lifespan(app),
        httpx.AsyncClient(
            transport=transport,
            base_url="http://local",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as test_client,
    ):
        yield test_client


async def test_an_unexpected_error_is_a_500_with_the_fly_body(
    backend: LocalBackend, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(org_slug: str | None) -> object:
        raise RuntimeError("a bug")

    monkeypatch.setattr(backend.service, "list_apps", broken)
    response = await client.get("/v1/apps")
    assert response.status_code == 500
    body = response.json()
    assert set(body) == {"error"} and "RuntimeError" in body["error"]
    assert "a bug" not in body["error"]  # details go to the server log, not to the client


def test_settings_repr_hides_the_token(backend: LocalBackend) -> None:
    assert TOKEN not in repr(backend.settings)


async def test_the_default_app_exists_from_the_start(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/apps/jobrunner-local")).status_code == 200
    health = await client.get("/healthz", headers={"Authorization": ""})
    assert health.json()["ok"] is True
