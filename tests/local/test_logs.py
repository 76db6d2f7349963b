"""The logs API: captured stdout/stderr in Fly's JSON:API shape, paged by next_token."""

from __future__ import annotations

import re

import httpx

from .local_harness import APP, command_config, create_machine, reach

LOGS = f"/api/v1/apps/{APP}/logs"


async def test_lines_are_captured_with_levels_and_meta(api: httpx.AsyncClient) -> None:
    machine = await create_machine(
        api, command_config("sh", "-c", "echo out-line; echo err-line >&2; printf partial")
    )
    await reach(api, machine["id"], "stopped")
    page = (await api.get(LOGS, params={"instance": machine["id"]})).json()
    messages = {e["attributes"]["message"]: e for e in page["data"]}
    assert set(messages) == {"out-line", "err-line", "partial"}
    out = messages["out-line"]
    assert out["type"] == "logs" and out["id"]
    attributes = out["attributes"]
    assert attributes["level"] == "info" and messages["err-line"]["attributes"]["level"] == "error"
    assert attributes["instance"] == machine["id"] and attributes["region"] == "local"
    assert attributes["meta"] == {
        "instance": machine["id"],
        "region": "local",
        "event": {"provider": "app"},
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", attributes["timestamp"])
    assert page["meta"]["next_token"] == page["data"][-1]["id"]


async def test_paging_by_next_token(api: httpx.AsyncClient) -> None:
    machine = await create_machine(api, command_config("sh", "-c", "seq 1 250"))
    await reach(api, machine["id"], "stopped")
    newest = (await api.get(LOGS, params={"instance": machine["id"]})).json()
    assert [e["attributes"]["message"] for e in newest["data"]] == [str(n) for n in range(151, 251)]
    seen: list[str] = []
    token = "0"
    while True:
        page = (await api.get(LOGS, params={"instance": machine["id"], "next_token": token})).json()
        if not page["data"]:
            assert page["meta"]["next_token"] == token  # an empty page gives the token back
            break
        assert len(page["data"]) <= 100
        seen += [e["attributes"]["message"] for e in page["data"]]
        token = page["meta"]["next_token"]
    assert seen == [str(n) for n in range(1, 251)]


async def test_filters_by_instance_and_region(api: httpx.AsyncClient) -> None:
    first = await create_machine(api, command_config("echo", "from-first"), region="ams")
    second = await create_machine(api, command_config("echo", "from-second"))
    await reach(api, first["id"], "stopped")
    await reach(api, second["id"], "stopped")
    ams = (await api.get(LOGS, params={"region": "ams"})).json()["data"]
    assert {e["attributes"]["message"] for e in ams} == {"from-first"}
    everything = (await api.get(LOGS)).json()["data"]  # the app's newest 100 lines
    assert {"from-first", "from-second"} <= {e["attributes"]["message"] for e in everything}


async def test_bad_token_and_unknown_app(api: httpx.AsyncClient) -> None:
    bad = await api.get(LOGS, params={"next_token": "yesterday"})
    assert bad.status_code == 400 and "next_token" in bad.json()["error"]
    for out_of_range in ("-1", str(2**64)):  # a number, but no token can be that
        response = await api.get(LOGS, params={"next_token": out_of_range})
        assert response.status_code == 400 and "next_token" in response.json()["error"]
    assert (await api.get("/api/v1/apps/nope/logs")).status_code == 404
