"""Bad input never gets a 5xx: it gets 400 or 422 with an error that names the field."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .local_harness import APP, command_config, create_machine

CASES: list[tuple[str, Any, int, str]] = [
    ("missing image", {"init": {"cmd": ["true"]}}, 422, "config.image"),
    (
        "mount without a volume",
        command_config("true", mounts=[{"path": "/data"}]),
        422,
        "config.mounts[0].volume",
    ),
    (
        "mount of an unknown volume",
        command_config("true", mounts=[{"volume": "vol_nothere", "path": "/data"}]),
        422,
        "config.mounts[0].volume",
    ),
    (
        "relative guest_path",
        command_config("true", files=[{"guest_path": "etc/x", "raw_value": "aGk="}]),
        422,
        "guest_path",
    ),
    (
        "invalid base64",
        command_config("true", files=[{"guest_path": "/x", "raw_value": "%%%"}]),
        422,
        "raw_value",
    ),
    (
        "both raw_value and secret_name",
        command_config(
            "true", files=[{"guest_path": "/x", "raw_value": "aGk=", "secret_name": "s"}]
        ),
        422,
        "exactly one",
    ),
    ("memory step", command_config("true", guest={"memory_mb": 300}), 422, "memory_mb"),
    (
        "memory too low for cpus",
        command_config("true", guest={"cpus": 2, "memory_mb": 256}),
        422,
        "memory_mb",
    ),
    ("shared memory too high", command_config("true", guest={"memory_mb": 4096}), 422, "memory_mb"),
    (
        "performance memory too low",
        command_config("true", guest={"cpu_kind": "performance", "memory_mb": 1024}),
        422,
        "memory_mb",
    ),
    ("unknown cpu_kind", command_config("true", guest={"cpu_kind": "quantum"}), 422, "cpu_kind"),
    (
        "unknown restart policy",
        command_config("true", restart={"policy": "sometimes"}),
        422,
        "restart.policy",
    ),
    (
        "negative max_retries",
        command_config("true", restart={"policy": "on-failure", "max_retries": -1}),
        422,
        "max_retries",
    ),
    ("unknown schedule", command_config("true", schedule="fortnightly"), 422, "schedule"),
    ("unknown size", command_config("true", size="huge-cpu-99x"), 422, "size"),
    (
        "bad stop signal",
        command_config("true", stop_config={"signal": "SIGFOO"}),
        422,
        "stop_config.signal",
    ),
    (
        "bad stop timeout",
        command_config("true", stop_config={"timeout": "soon"}),
        422,
        "stop_config.timeout",
    ),
    ("env not strings", command_config("true", env={"A": 1}), 400, "config.env.A"),
    ("env name with =", command_config("true", env={"A=B": "1"}), 422, "'A=B'"),
    ("env value with NUL", command_config("true", env={"TOKEN": "a\0b"}), 422, "config.env.TOKEN"),
    ("argv with NUL", command_config("echo", "a\0b"), 422, "config.init.cmd[1]"),
    ("cpus not int", command_config("true", guest={"cpus": "two"}), 400, "config.guest.cpus"),
    ("config not object", "nope", 400, "config"),
]


@pytest.mark.parametrize(
    ("config", "status", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_invalid_configs_are_refused_naming_the_field(
    api: httpx.AsyncClient, config: Any, status: int, field: str
) -> None:
    response = await api.post(f"/v1/apps/{APP}/machines", json={"config": config})
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and field in body["error"], body


NOT_UTF8 = b'{"config": "\xff"}'


@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b"", b'{"config": {"image": "x"', NOT_UTF8])
async def test_malformed_bodies_are_400(api: httpx.AsyncClient, raw: bytes) -> None:
    response = await api.post(
        f"/v1/apps/{APP}/machines", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert "error" in response.json()


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", ""), ("POST", "/{id}"), ("POST", "/{id}/stop"), ("POST", "/{id}/lease"),
     ("POST", "/{id}/metadata/k"), ("POST", "/{id}/signal")],
)  # fmt: skip
@pytest.mark.parametrize("depth", [100, 5000])
async def test_absurdly_nested_bodies_are_400_not_500(
    api: httpx.AsyncClient, method: str, path: str, depth: int
) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    nested = "[" * depth + "]" * depth
    raw = '{"config": {"image": "x", "init": {"cmd": ["true"]}, "services": [' + nested + "]}}"
    url = f"/v1/apps/{APP}/machines" + path.format(id=machine["id"])
    response = await api.request(
        method, url, content=raw.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert "levels deep" in response.json()["error"]
    assert (await api.get(f"/v1/apps/{APP}/machines/{machine['id']}")).json()["state"] == "created"


async def test_wrong_types_elsewhere_are_400(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    url = f"/v1/apps/{APP}/machines/{machine['id']}"
    assert (await api.post(url + "/stop", json={"signal": ["SIGTERM"]})).status_code == 400
    assert (await api.post(url + "/stop", json={"timeout": {"s": 1}})).status_code == 400
    assert (await api.post(url + "/signal", json={})).status_code == 400
    assert (await api.post(url + "/signal", json={"signal": True})).status_code in (400, 412)
    assert (await api.post(url, json={"config": 5})).status_code == 400
    assert (await api.get(f"/v1/apps/{APP}/machines?include_deleted=maybe")).status_code == 400
    assert (await api.post("/v1/apps", json={"app_name": 5})).status_code == 400
    assert (await api.post("/v1/apps", json={"app_name": "Bad Name"})).status_code == 422


async def test_size_presets_fill_the_guest(api: httpx.AsyncClient) -> None:
    machine = await create_machine(
        api, command_config("true", size="performance-2x"), skip_launch=True
    )
    assert machine["config"]["guest"] == {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096}
    sized = await create_machine(
        api, command_config("true", guest={"cpus": 2, "memory_mb": 1024}), skip_launch=True
    )
    assert sized["config"]["guest"]["cpu_kind"] == "shared"


async def test_unknown_fields_are_kept(api: httpx.AsyncClient) -> None:
    config = command_config("true", services=[{"ports": []}], brand_new_field={"x": 1})
    machine = await create_machine(api, config, skip_launch=True, some_future_flag=True)
    assert machine["config"]["brand_new_field"] == {"x": 1}
    assert machine["config"]["services"] == [{"ports": []}]
