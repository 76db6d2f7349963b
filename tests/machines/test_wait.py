"""The wait loop: long polls up to an overall deadline, 404 after create, destroyed machines."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import respx

from jobrunner.machines import (
    AsyncMachinesClient,
    BadRequest,
    Machine,
    MachineDestroyed,
    MachinesConnectionError,
    NotFound,
    ServerError,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
)
from jobrunner.machines.wait import poll_seconds

from .conftest import MACHINE_ID, MACHINES, FakeClock, load

WAIT = f"{MACHINES}/{MACHINE_ID}/wait"
GET = f"{MACHINES}/{MACHINE_ID}"


def long_poll(
    clock: FakeClock, answers: list[httpx.Response]
) -> Callable[[httpx.Request], httpx.Response]:
    """A side effect that takes as long as the poll's timeout, then gives the next answer."""
    queue = list(answers)

    def respond(request: httpx.Request) -> httpx.Response:
        answer = queue.pop(0)
        if answer.status_code == 408:
            clock.advance(int(request.url.params["timeout"]))
        return answer

    return respond


def timeout_408() -> httpx.Response:
    return httpx.Response(408, json=load("error_408"), headers={"fly-request-id": "req-408"})


def polls(route: respx.Route) -> list[int]:
    return [int(call.request.url.params["timeout"]) for call in route.calls]


@pytest.mark.parametrize(
    ("remaining", "expected"), [(0.2, 1), (1.0, 1), (59.2, 60), (60, 60), (150, 60)]
)
def test_poll_seconds(remaining: float, expected: int) -> None:
    assert poll_seconds(remaining) == expected


async def test_408s_loop_to_an_overall_timeout_beyond_60s(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    route = router.get(WAIT).mock(side_effect=long_poll(clock, [timeout_408()] * 3))
    with pytest.raises(WaitTimeout) as info:
        await client.wait(MACHINE_ID, "started", instance_id="01HINST", timeout=150)
    assert polls(route) == [60, 60, 30]
    assert clock.now == 150
    exc = info.value
    assert exc.status_code == 408
    assert "within 150 s" in str(exc)
    assert "currently stopped" in str(exc)  # the API's last words are kept
    assert exc.request_id == "req-408"
    for call in route.calls:
        params = call.request.url.params
        assert params.get_list("state") == ["started"]
        assert params["instance_id"] == "01HINST"
        # The read timeout outlasts the poll, or the long poll itself would time out.
        read = call.request.extensions["timeout"]["read"]
        assert read > int(params["timeout"])


async def test_success_after_several_408s(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    answers = [timeout_408(), timeout_408(), httpx.Response(200, json={"ok": True})]
    route = router.get(WAIT).mock(side_effect=long_poll(clock, answers))
    await client.wait(MACHINE_ID, "stopped", instance_id="01HINST", timeout=600)
    assert polls(route) == [60, 60, 60]
    assert clock.now == 120


async def test_machine_argument_supplies_instance_id(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.get(WAIT).respond(json={"ok": True})
    machine = Machine.model_validate(load("machine_started"))
    await client.wait(machine, "stopped", timeout=30)
    params = route.calls.last.request.url.params
    assert params["instance_id"] == machine.instance_id
    assert params["timeout"] == "30"
    await client.wait(machine, "stopped", instance_id="explicit", version="v2", from_event_id="e1")
    params = route.calls.last.request.url.params
    assert (params["instance_id"], params["version"], params["from_event_id"]) == (
        "explicit",
        "v2",
        "e1",
    )


async def test_multiple_states_repeat_the_state_param(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    route = router.get(WAIT).respond(json={"ok": True})
    await client.wait(MACHINE_ID, ["stopped", "suspended", "destroyed"], timeout=10)
    params = route.calls.last.request.url.params
    assert params.get_list("state") == ["stopped", "suspended", "destroyed"]
    assert "instance_id" not in params


async def test_unknown_state_is_refused_before_any_call(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    with pytest.raises(ValueError, match="running"):
        await client.wait(MACHINE_ID, "running")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await client.wait(MACHINE_ID, [])
    assert router.calls.call_count == 0


async def test_404_right_after_create_then_success(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    wait = router.get(WAIT).mock(
        side_effect=[
            httpx.Response(404, json=load("error_404")),
            httpx.Response(404, json=load("error_404")),
            httpx.Response(200, json={"ok": True}),
        ]
    )
    get = router.get(GET).respond(404, json=load("error_404"))
    await client.wait(MACHINE_ID, "started", timeout=60)
    assert wait.call_count == 3
    assert get.call_count == 2
    assert clock.sleeps == [0.5, 1.0]  # backoff between tries, well inside the grace period


async def test_404_that_outlasts_the_grace_period_raises(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    wait = router.get(WAIT).respond(404, json=load("error_404"))
    router.get(GET).respond(404, json=load("error_404"))
    with pytest.raises(NotFound) as info:
        await client.wait(MACHINE_ID, "started", timeout=300, not_found_grace=10)
    assert not isinstance(info.value, MachineDestroyed)
    assert 10 <= clock.now < 13
    assert wait.call_count == 8  # 0.5 + 1 + 2 + 2 + 2 + 2 + 2 s of backoff, then give up


async def test_destroyed_machine_while_waiting_for_started(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    router.get(WAIT).respond(404, json=load("error_404"))
    router.get(GET).respond(json=load("machine_destroyed"))
    with pytest.raises(MachineDestroyed) as info:
        await client.wait(MACHINE_ID, "started", timeout=60)
    exc = info.value
    assert exc.machine.state == "destroyed"
    assert exc.machine.exit_code == 3
    assert isinstance(exc, NotFound)
    assert "exit code 3" in str(exc)


@pytest.mark.parametrize(
    "states", [["destroyed"], ["stopped"], ["settled"], ["started", "destroyed"]]
)
async def test_destroyed_machine_satisfies_destroyed_stopped_settled(
    client: AsyncMachinesClient, router: respx.MockRouter, states: list[str]
) -> None:
    wait = router.get(WAIT).respond(404, json=load("error_404"))
    router.get(GET).respond(json=load("machine_destroyed"))
    await client.wait(MACHINE_ID, states, timeout=60)  # type: ignore[arg-type]
    assert wait.call_count == 1


async def test_destroying_counts_as_gone(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    router.get(WAIT).respond(404, json=load("error_404"))
    router.get(GET).respond(json={**load("machine_destroyed"), "state": "destroying"})
    with pytest.raises(MachineDestroyed):
        await client.wait(MACHINE_ID, "suspended", timeout=60)


async def test_400_is_fatal(client: AsyncMachinesClient, router: respx.MockRouter) -> None:
    wait = router.get(WAIT).respond(400, json={"error": "invalid_argument: timeout"})
    with pytest.raises(BadRequest):
        await client.wait(MACHINE_ID, "stopped", timeout=600)
    assert wait.call_count == 1


async def test_transient_errors_inside_a_poll_are_retried(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    wait = router.get(WAIT).mock(
        side_effect=[
            httpx.Response(503, json={"error": "unavailable"}),
            httpx.ReadError("connection reset"),
            httpx.Response(200, json={"ok": True}),
        ]
    )
    await client.wait(MACHINE_ID, "started", timeout=60)
    assert wait.call_count == 3


async def test_an_instant_408_does_not_spin(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    wait = router.get(WAIT).mock(return_value=timeout_408())  # comes back at once
    with pytest.raises(WaitTimeout):
        await client.wait(MACHINE_ID, "started", timeout=5)
    assert wait.call_count == 5  # about one poll a second, not thousands
    assert polls(wait) == [5, 4, 3, 2, 1]


async def test_zero_timeout_still_polls_once(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    wait = router.get(WAIT).mock(
        side_effect=[timeout_408(), httpx.Response(200, json={"ok": True})]
    )
    with pytest.raises(WaitTimeout):
        await client.wait(MACHINE_ID, "started", timeout=0)
    assert polls(wait) == [1]
    await client.wait(MACHINE_ID, "started", timeout=0)
    assert polls(wait) == [1, 1]


# -- transient failures during a long wait ---------------------------------------------------


async def test_an_outage_longer_than_one_calls_retries_does_not_end_a_long_wait(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    # Ten seconds of 503s: far more than a single call's 5 tries (~2 s of backoff) would cover.
    def flaky(request: httpx.Request) -> httpx.Response:
        if clock.now < 10:
            return httpx.Response(503, json={"error": "unavailable"})
        return httpx.Response(200, json={"ok": True})

    wait = router.get(WAIT).mock(side_effect=flaky)
    await client.wait(MACHINE_ID, "stopped", instance_id="01HINST", timeout=3600)
    assert wait.call_count > 5
    assert 10 <= clock.now < 20


async def test_a_long_poll_dropped_at_60s_is_polled_again(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    tries = iter(range(1, 100))

    def dropped_then_ok(request: httpx.Request) -> httpx.Response:
        if next(tries) == 1:  # the first poll is cut off just as it would have ended
            clock.advance(int(request.url.params["timeout"]))
            raise httpx.RemoteProtocolError("server disconnected")
        return httpx.Response(200, json={"ok": True})

    wait = router.get(WAIT).mock(side_effect=dropped_then_ok)
    await client.wait(MACHINE_ID, "stopped", timeout=3600)
    assert polls(wait) == [60, 60]


async def test_a_failure_streak_longer_than_max_total_gives_up(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    wait = router.get(WAIT).respond(503, json={"error": "unavailable"})
    with pytest.raises(ServerError):
        await client.wait(MACHINE_ID, "stopped", timeout=3600)
    assert wait.call_count > 5
    assert clock.now <= 60  # FIXED_RETRY.max_total, well before the hour is up


async def test_retry_after_is_honoured_while_waiting(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    wait = router.get(WAIT).mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "4"}, json={"error": "rate limited"}),
            httpx.Response(200, json={"ok": True}),
        ]
    )
    await client.wait(MACHINE_ID, "started", timeout=60)
    assert wait.call_count == 2
    assert clock.sleeps == [4.0]


async def test_a_failure_at_the_deadline_is_raised_not_slept_through(
    client: AsyncMachinesClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    router.get(WAIT).mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(MachinesConnectionError):
        await client.wait(MACHINE_ID, "started", timeout=1)
    assert clock.now <= 1


@pytest.mark.parametrize(("status", "cls"), [(401, Unauthorized), (422, ValidationFailed)])
async def test_other_errors_end_the_wait_at_once(
    client: AsyncMachinesClient,
    router: respx.MockRouter,
    status: int,
    cls: type[Exception],
) -> None:
    wait = router.get(WAIT).respond(status, json={"error": "no"})
    with pytest.raises(cls):
        await client.wait(MACHINE_ID, "started", timeout=600)
    assert wait.call_count == 1


async def test_nan_timeouts_are_refused_before_any_call(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    with pytest.raises(ValueError, match="timeout"):
        await client.wait(MACHINE_ID, "started", timeout=float("nan"))
    with pytest.raises(ValueError, match="not_found_grace"):
        await client.wait(MACHINE_ID, "started", not_found_grace=float("nan"))
    assert router.calls.call_count == 0


async def test_a_negative_timeout_polls_once(
    client: AsyncMachinesClient, router: respx.MockRouter
) -> None:
    wait = router.get(WAIT).respond(json={"ok": True})
    await client.wait(MACHINE_ID, "started", timeout=-5)
    assert polls(wait) == [1]
