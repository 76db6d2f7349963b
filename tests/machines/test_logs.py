"""The logs API: request shape, JSON:API parsing (any key case), paging and following."""

from __future__ import annotations

import httpx
import pytest
import respx

from jobrunner.machines import (
    AsyncMachinesClient,
    LogEntry,
    NotFound,
    ServerError,
    Unauthorized,
)
from jobrunner.machines.logs import parse_logs_page

from .conftest import LOGS, MACHINE_ID, TOKEN, FakeClock, load

T1 = "1699408354000000000"
T2 = "1699408360000000000"


def tokens(route: respx.Route) -> list[str]:
    return [call.request.url.params["next_token"] for call in route.calls]


async def test_get_logs_request_and_parse(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.get(LOGS).respond(json=load("logs_page_1"))
    page = await client.get_logs(instance=MACHINE_ID, region="ord")
    request = route.calls.last.request
    assert request.url.host == "api.fly.io"
    assert list(request.url.params.multi_items()) == [
        ("next_token", ""),
        ("instance", MACHINE_ID),
        ("region", "ord"),
    ]
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert [e.message for e in page.entries] == ["starting job", "working"]
    first = page.entries[0]
    assert (first.id, first.level, first.instance, first.region) == (
        "log1",
        "info",
        MACHINE_ID,
        "ord",
    )
    assert first.timestamp == "2023-11-08T01:52:33.123456789Z"
    assert first.meta is not None and first.meta["event"] == {"provider": "app"}
    assert page.next_token == T1


async def test_get_logs_pages_forward_and_omits_empty_filters(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.get(LOGS).respond(json=load("logs_empty"))
    page = await client.get_logs(next_token=T1)
    assert list(route.calls.last.request.url.params.multi_items()) == [("next_token", T1)]
    assert page.entries == []
    assert page.next_token is None


def test_parse_is_case_insensitive() -> None:
    page = parse_logs_page(load("logs_page_2_capitalised"))
    assert page.entries == [
        LogEntry(
            id="log3",
            timestamp="2023-11-08T01:52:40.000000000Z",
            message="done",
            level="info",
            instance=MACHINE_ID,
            region="ord",
        )
    ]
    assert page.next_token == T2


def test_parse_tolerates_odd_documents() -> None:
    assert parse_logs_page(None).entries == []
    assert parse_logs_page({"data": "nope", "meta": []}).entries == []
    odd = parse_logs_page({"data": [{"attributes": {"message": "no time"}}, "junk"]})
    assert [e.message for e in odd.entries] == ["no time"]


async def test_get_logs_retries_transient_errors(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.get(LOGS).mock(
        side_effect=[httpx.Response(503), httpx.Response(200, json=load("logs_page_1"))]
    )
    page = await client.get_logs()
    assert route.call_count == 2
    assert len(page.entries) == 2


async def test_follow_pages_like_flyctl(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    route = router.get(LOGS).mock(
        side_effect=[
            httpx.Response(200, json=load("logs_page_1")),
            httpx.Response(200, json=load("logs_empty")),
            httpx.Response(200, json=load("logs_page_2_capitalised")),
            httpx.Response(200, json=load("logs_empty")),
        ]
    )
    checks: list[int] = []

    def until() -> bool:
        checks.append(route.call_count)
        return len(checks) >= 2  # the job "finished" before the second empty page

    lines = [
        entry.message
        async for entry in client.follow_logs(instance=MACHINE_ID, poll_interval=0.25, until=until)
    ]
    assert lines == ["starting job", "working", "done"]
    # Always a token; the last non-empty one is kept across the empty page.
    assert tokens(route) == ["", T1, T1, T2]
    # Only the empty page that did not end the follow was followed by a sleep.
    assert clock.sleeps == [0.25]
    assert checks == [2, 4]
    assert all(c.request.url.params["instance"] == MACHINE_ID for c in route.calls)


async def test_follow_starts_from_a_given_token(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.get(LOGS).respond(json=load("logs_empty"))
    lines = [e async for e in client.follow_logs(next_token=T2, until=lambda: True)]
    assert lines == []
    assert tokens(route) == [T2]


async def test_follow_backs_off_on_errors_and_recovers(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    route = router.get(LOGS).mock(
        side_effect=[
            httpx.Response(503),
            httpx.ReadError("reset"),
            httpx.Response(500),
            httpx.Response(200, json=load("logs_page_1")),
            httpx.Response(200, json=load("logs_empty")),
        ]
    )
    lines = [e.message async for e in client.follow_logs(until=lambda: True)]
    assert lines == ["starting job", "working"]
    assert route.call_count == 5  # one request per try: no retry policy stacked on top
    assert clock.sleeps == [0.5, 1.0, 2.0]


async def test_follow_gives_up_after_ten_errors_in_a_row(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    route = router.get(LOGS).respond(502)
    with pytest.raises(ServerError):
        async for _ in client.follow_logs():
            pass
    assert route.call_count == 10
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0]


@pytest.mark.parametrize(("status", "cls"), [(401, Unauthorized), (404, NotFound)])
async def test_follow_stops_at_once_on_401_and_404(
    client: AsyncMachinesClient,
    router: respx.MockRouter,
    clock: FakeClock,
    status: int,
    cls: type[Exception],
) -> None:
    route = router.get(LOGS).respond(status, json={"error": "no"})
    with pytest.raises(cls):
        async for _ in client.follow_logs():
            pass
    assert route.call_count == 1
    assert clock.sleeps == []
