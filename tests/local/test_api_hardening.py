"""Issue 9, points 6 and 7: input that used to answer 500 (and poison later reads) is refused
with a 4xx naming the field, and request bodies have a size limit enforced while reading."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from jobrunner.local.api.app import MAX_BODY_BYTES, _SafeJSONResponse
from jobrunner.local.api.validate import MAX_FILE_BYTES

from .local_harness import APP, ServerProcess, command_config, create_machine

MACHINES = f"/v1/apps/{APP}/machines"
HUGE = "1" * 5000
JSON = {"content-type": "application/json"}


async def post_raw(api: httpx.AsyncClient, url: str, raw: str) -> httpx.Response:
    return await api.post(url, content=raw.encode(), headers=JSON)


async def all_machines(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await api.get(MACHINES, params={"include_deleted": "true"})
    assert response.status_code == 200, response.text
    machines: list[dict[str, Any]] = response.json()
    return machines


@pytest.mark.parametrize(
    ("where", "template"),
    [
        ("create", '{"config": {"image": "x", "init": {"cmd": ["true"]}, "guest": {"cpus": N}}}'),
        ("create", '{"config": {"image": "x", "init": {"cmd": ["true"]}}, "lease_ttl": -N}'),
        ("stop", '{"timeout": N}'),
        ("stop", '{"timeout": 1eN}'),
        ("stop", '{"timeout": Infinity}'),
        ("lease", '{"ttl": N}'),
        ("app", '{"app_name": "a", "org_slug": "personal", "network": N}'),
    ],
)
async def test_absurd_numbers_are_400_not_500(
    api: httpx.AsyncClient, where: str, template: str
) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    url = {
        "create": MACHINES,
        "stop": f"{MACHINES}/{machine['id']}/stop",
        "lease": f"{MACHINES}/{machine['id']}/lease",
        "app": "/v1/apps",
    }[where]
    before = len(await all_machines(api))
    response = await post_raw(api, url, template.replace("N", HUGE))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "out of range" in error or "not a JSON number" in error
    assert len(error) < 400  # the 5,000 digits are not echoed back
    assert len(await all_machines(api)) == before  # nothing was created


async def test_numbers_just_beyond_64_bits_are_refused_and_ordinary_ones_taken(
    api: httpx.AsyncClient,
) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    lease = f"{MACHINES}/{machine['id']}/lease"
    assert (await post_raw(api, lease, '{"ttl": 18446744073709551616}')).status_code == 400
    taken = await post_raw(api, lease, '{"ttl": 30}')
    assert taken.status_code == 201, taken.text


SURROGATE = "\\ud800"  # as JSON text: decodes to a lone surrogate


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"env": {"X": "@"}}, "config.env.X"),
        ({"env": {"@": "x"}}, "config.env.\\ud800"),
        ({"image": "@"}, "config.image"),
        ({"metadata": {"team": "@"}}, "config.metadata.team"),
        ({"init": {"exec": ["/bin/echo", "@"]}}, "config.init.exec[1]"),
    ],
)
async def test_lone_surrogates_are_refused_before_anything_happens(
    api: httpx.AsyncClient, config: dict[str, Any], field: str
) -> None:
    before = len(await all_machines(api))
    body = {"config": {**command_config("/bin/echo", "hi"), **config}}
    raw = json.dumps(body).replace("@", SURROGATE)
    response = await post_raw(api, MACHINES, raw)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error.startswith(field + ":") and "UTF-8" in error
    after = await all_machines(api)  # reads keep working, and nothing was created
    assert len(after) == before


async def test_lone_surrogates_in_other_bodies_are_refused(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("true"), skip_launch=True)
    base = f"{MACHINES}/{machine['id']}"
    for url, raw in [
        (base + "/metadata/k", '{"value": "@"}'),
        (base + "/lease", '{"description": "@"}'),
        (base, '{"config": {"image": "x", "init": {"cmd": ["@"]}}}'),
        ("/v1/apps", '{"app_name": "@", "org_slug": "personal"}'),
    ]:
        response = await post_raw(api, url, raw.replace("@", SURROGATE))
        assert response.status_code == 400, (url, response.text)
        assert "UTF-8" in response.json()["error"]
    got = await api.get(base)
    assert got.status_code == 200 and "k" not in (got.json()["config"].get("metadata") or {})


def test_an_answer_holding_text_json_cannot_carry_still_renders() -> None:
    # Records written before these checks may hold such values: reads must not fail on them.
    response = _SafeJSONResponse({"env": {"X": "a\ud800b"}, "t": float("inf"), "ok": ["é"]})
    decoded = json.loads(response.body)
    assert decoded == {"env": {"X": "a\ud800b"}, "t": None, "ok": ["é"]}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def big_config_body(size: int) -> bytes:
    padding = "x" * size
    return json.dumps({"config": {**command_config("true"), "env": {"PAD": padding}}}).encode()


async def test_a_body_over_the_limit_is_413_without_being_held(
    api: httpx.AsyncClient, server: ServerProcess
) -> None:
    before_machines = len(await all_machines(api))
    await api.get(MACHINES)  # warm up
    before = rss_kib(server.pid)
    body = big_config_body(50 * 1024 * 1024)
    response = await api.post(MACHINES, content=body, headers=JSON)
    assert response.status_code == 413, response.text[:200]
    assert "MiB" in response.json()["error"]
    # Six at once, as in the report (683 MB before the limit).
    answers = await asyncio.gather(
        *(api.post(MACHINES, content=body, headers=JSON) for _ in range(6))
    )
    assert [a.status_code for a in answers] == [413] * 6
    assert rss_kib(server.pid) - before < 8 * 1024  # KiB: a few MB, not 50 (or 300)
    assert len(await all_machines(api)) == before_machines
    assert (await api.get(MACHINES)).status_code == 200


async def test_a_chunked_body_is_counted_while_it_arrives(
    api: httpx.AsyncClient, server: ServerProcess
) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"config": {"image": "x", "env": {"PAD": "'
        for _ in range(50 * 16):  # 50 MiB in 64 KiB pieces, without a Content-Length
            sent += 65536
            yield b"x" * 65536
        yield b'"}}}'

    before = rss_kib(server.pid)
    response = await api.post(MACHINES, content=chunks(), headers=JSON)
    assert response.status_code == 413, response.text[:200]
    # It held at most the limit of this body while reading it (plus the allocator's slack).
    assert rss_kib(server.pid) - before < (MAX_BODY_BYTES // 1024) + 16 * 1024


async def test_bodies_under_the_limit_are_taken(api: httpx.AsyncClient) -> None:
    body = big_config_body(2 * 1024 * 1024)
    response = await api.post(MACHINES, content=body, headers=JSON, params={"skip_launch": "1"})
    assert response.status_code == 200, response.text[:200]


async def test_a_files_entry_over_its_limit_is_413_naming_it(api: httpx.AsyncClient) -> None:
    raw_value = "QUFB" * ((MAX_FILE_BYTES // 3) + 1024)  # base64 of a little over the limit
    config = command_config("true", files=[{"guest_path": "/data/big", "raw_value": raw_value}])
    response = await api.post(MACHINES, json={"config": config})
    assert response.status_code == 413, response.text[:200]
    assert response.json()["error"].startswith("config.files[0].raw_value")
