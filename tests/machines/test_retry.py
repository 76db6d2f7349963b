"""Retries: what is retried, for which calls, how long it waits, and where it stops."""

from __future__ import annotations

import email.utils

import httpx
import pytest
import respx

from jobrunner.machines import (
    AsyncMachinesClient,
    BadRequest,
    InsufficientCapacity,
    MachinesAPIError,
    MachinesConnectionError,
    NotFound,
    RateLimited,
    RequestRetryPolicy,
    ServerError,
    Unauthorized,
    ValidationFailed,
)

from .conftest import API, MACHINE_ID, MACHINES, FakeClock, load, make_client

M = f"{MACHINES}/{MACHINE_ID}"
# FIXED_RETRY (conftest): base 0.2 s doubling, equal jitter at its middle = 0.75 x nominal.
BACKOFFS = [0.15, 0.3, 0.6, 1.2]

TRANSIENT = [
    pytest.param(httpx.ConnectError("refused"), id="connect-refused"),
    pytest.param(httpx.ReadError("connection reset by peer"), id="reset"),
    pytest.param(httpx.ReadTimeout("timed out"), id="read-timeout"),
    pytest.param(httpx.RemoteProtocolError("server disconnected"), id="dropped"),
    pytest.param(httpx.Response(429, json={"error": "rate limited"}), id="429"),
    pytest.param(httpx.Response(502, text="bad gateway"), id="502"),
    pytest.param(httpx.Response(503, json={"error": "unavailable"}), id="503"),
    pytest.param(httpx.Response(504, text="gateway timeout"), id="504"),
]


@pytest.mark.parametrize("failure", TRANSIENT)
async def test_get_is_retried_on_transient_failures(
    client: AsyncMachinesClient,
    router: respx.MockRouter,
    clock: FakeClock,
    failure: httpx.Response | Exception,
) -> None:
    route = router.get(M).mock(
        side_effect=[failure, failure, httpx.Response(200, json=load("machine_started"))]
    )
    machine = await client.get_machine(MACHINE_ID)
    assert machine.id == MACHINE_ID
    assert route.call_count == 3
    assert clock.sleeps == pytest.approx(BACKOFFS[:2])


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, BadRequest), (401, Unauthorized), (404, NotFound), (422, ValidationFailed)],
)
async def test_no_retry_on_client_errors(
    client: AsyncMachinesClient,
    router: respx.MockRouter,
    clock: FakeClock,
    status: int,
    cls: type[MachinesAPIError],
) -> None:
    route = router.get(M).respond(status, json={"error": "no"})
    with pytest.raises(cls):
        await client.get_machine(MACHINE_ID)
    assert route.call_count == 1
    assert clock.sleeps == []


async def test_no_retry_on_insufficient_capacity(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.get(M).respond(503, json=load("error_503_insufficient_capacity"))
    with pytest.raises(InsufficientCapacity):
        await client.get_machine(MACHINE_ID)
    assert route.call_count == 1


async def test_retry_after_seconds_is_honoured(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    route = router.get(M).mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "3"}, json={"error": "rate limited"}),
            httpx.Response(503, headers={"Retry-After": "1.5"}),
            httpx.Response(200, json=load("machine_started")),
        ]
    )
    await client.get_machine(MACHINE_ID)
    assert route.call_count == 3
    assert clock.sleeps == [3.0, 1.5]


async def test_retry_after_http_date_is_honoured(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    when = email.utils.formatdate(clock.time() + 7, usegmt=True)
    router.get(M).mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": when}),
            httpx.Response(200, json=load("machine_started")),
        ]
    )
    await client.get_machine(MACHINE_ID)
    assert clock.sleeps == [7.0]


async def test_attempts_are_bounded(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    route = router.get(M).respond(503, json={"error": "unavailable"})
    with pytest.raises(ServerError):
        await client.get_machine(MACHINE_ID)
    assert route.call_count == 5
    assert clock.sleeps == pytest.approx(BACKOFFS)


async def test_total_time_is_bounded(router: respx.MockRouter, clock: FakeClock) -> None:
    policy = RequestRetryPolicy(max_attempts=50, max_total=1.0, rng=lambda: 0.5)
    route = router.get(M).respond(502)
    async with make_client(router, clock, retry=policy) as client:
        with pytest.raises(ServerError):
            await client.get_machine(MACHINE_ID)
    # 0.15 + 0.3 fit in 1 s; the next 0.6 would end at 1.05 s, so it stops there.
    assert clock.sleeps == pytest.approx([0.15, 0.3])
    assert route.call_count == 3


async def test_retry_after_beyond_the_budget_gives_up_at_once(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    route = router.get(M).respond(429, headers={"Retry-After": "120"})
    with pytest.raises(RateLimited) as info:
        await client.get_machine(MACHINE_ID)
    assert route.call_count == 1
    assert clock.sleeps == []
    assert info.value.retry_after == 120.0


async def test_connection_errors_exhausted_raise_connection_error(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.get(M).mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(MachinesConnectionError):
        await client.get_machine(MACHINE_ID)
    assert route.call_count == 5


# Every call the retry.py docstring lists as idempotent (GETs beyond get_machine included).
IDEMPOTENT = [
    ("DELETE", M, lambda c: c.delete_machine(MACHINE_ID, force=True), {}),
    ("POST", f"{M}/stop", lambda c: c.stop_machine(MACHINE_ID), {}),
    ("POST", f"{M}/start", lambda c: c.start_machine(MACHINE_ID), {}),
    ("POST", f"{M}/suspend", lambda c: c.suspend_machine(MACHINE_ID), {}),
    ("POST", f"{M}/cordon", lambda c: c.cordon(MACHINE_ID), {}),
    ("POST", f"{M}/uncordon", lambda c: c.uncordon(MACHINE_ID), {}),
    ("POST", f"{M}/metadata/k", lambda c: c.set_metadata(MACHINE_ID, "k", "v"), {}),
    ("DELETE", f"{M}/metadata/k", lambda c: c.delete_metadata(MACHINE_ID, "k"), {}),
    ("GET", f"{M}/metadata", lambda c: c.get_metadata(MACHINE_ID), {}),
    ("GET", f"{M}/events", lambda c: c.list_events(MACHINE_ID), []),
    ("GET", f"{M}/lease", lambda c: c.get_lease(MACHINE_ID), load("lease")),
    ("DELETE", f"{M}/lease", lambda c: c.release_lease(MACHINE_ID, "n"), load("lease_released")),
    ("GET", MACHINES, lambda c: c.list_machines(), []),
    ("GET", f"{API}/v1/apps", lambda c: c.list_apps(), []),
    ("GET", f"{API}/v1/apps/a1", lambda c: c.get_app("a1"), load("app")),
    ("DELETE", f"{API}/v1/apps/a1", lambda c: c.delete_app("a1"), {}),
]


@pytest.mark.parametrize(("method", "url", "call", "answer"), IDEMPOTENT)
async def test_idempotent_calls_retry_after_an_ambiguous_failure(
    client: AsyncMachinesClient,
    router: respx.MockRouter,
    method: str,
    url: str,
    call: object,
    answer: object,
) -> None:
    route = router.route(method=method, url=url).mock(
        side_effect=[
            httpx.Response(502),
            httpx.ReadError("reset"),
            httpx.Response(200, json=answer),
        ]
    )
    await call(client)  # type: ignore[operator]
    assert route.call_count == 3


# Calls that must not be repeated once the request may have reached the server.
NOT_IDEMPOTENT = [
    pytest.param(f"{M}/restart", lambda c: c.restart_machine(MACHINE_ID), id="restart"),
    pytest.param(f"{M}/signal", lambda c: c.signal_machine(MACHINE_ID, "SIGHUP"), id="signal"),
    pytest.param(M, lambda c: c.update_machine(MACHINE_ID, {"image": "a"}), id="update"),
    pytest.param(f"{API}/v1/apps", lambda c: c.create_app("a1"), id="create-app"),
    pytest.param(f"{M}/lease", lambda c: c.acquire_lease(MACHINE_ID, ttl=30), id="new-lease"),
    pytest.param(f"{M}/exec", lambda c: c.exec_machine(MACHINE_ID, ["ls"]), id="exec"),
]


@pytest.mark.parametrize(("url", "call"), NOT_IDEMPOTENT)
@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(httpx.Response(503, json={"error": "unavailable"}), id="503"),
        pytest.param(httpx.Response(502), id="502"),
        pytest.param(httpx.ReadTimeout("timed out"), id="read-timeout"),
        pytest.param(httpx.RemoteProtocolError("server disconnected"), id="dropped"),
    ],
)
async def test_non_idempotent_calls_are_not_retried_when_ambiguous(
    client: AsyncMachinesClient,
    router: respx.MockRouter,
    failure: httpx.Response | Exception,
    url: str,
    call: object,
) -> None:
    route = router.post(url).mock(side_effect=[failure, httpx.Response(200)])
    with pytest.raises((ServerError, MachinesConnectionError)):
        await call(client)  # type: ignore[operator]
    assert route.call_count == 1


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(httpx.Response(429, json={"error": "rate limited"}), id="429"),
        pytest.param(httpx.ConnectError("refused"), id="never-connected"),
    ],
)
async def test_non_idempotent_calls_retry_when_nothing_happened(
    client: AsyncMachinesClient, router: respx.MockRouter, failure: httpx.Response | Exception
) -> None:
    route = router.post(f"{M}/restart").mock(side_effect=[failure, httpx.Response(200)])
    await client.restart_machine(MACHINE_ID)
    assert route.call_count == 2


async def test_fresh_lease_is_not_retried_but_refresh_is(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.post(f"{M}/lease").mock(
        side_effect=[
            httpx.Response(502),
            httpx.Response(502),
            httpx.Response(200, json=load("lease")),
        ]
    )
    with pytest.raises(ServerError):
        await client.acquire_lease(MACHINE_ID, ttl=30)
    assert route.call_count == 1
    lease = await client.acquire_lease(MACHINE_ID, ttl=30, nonce="5c35f65c9f95")
    assert lease.ok
    assert route.call_count == 3


@pytest.mark.parametrize(
    ("jitter", "rng", "expected"),
    [
        ("equal", 0.0, [0.1, 0.2, 0.4, 4.0]),
        ("equal", 1.0, [0.2, 0.4, 0.8, 8.0]),
        ("full", 0.0, [0.0, 0.0, 0.0, 0.0]),
        ("full", 1.0, [0.2, 0.4, 0.8, 8.0]),
    ],
)
def test_backoff_jitter_bounds_and_cap(jitter: str, rng: float, expected: list[float]) -> None:
    policy = RequestRetryPolicy(jitter=jitter, rng=lambda: rng)  # type: ignore[arg-type]
    assert [policy.backoff(n) for n in (1, 2, 3, 10)] == pytest.approx(expected)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RequestRetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RequestRetryPolicy(base_delay=-1)
