"""Creating machines never makes duplicates: the submit id and the look-before-retry rule."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import respx

from jobrunner.machines import (
    AsyncMachinesClient,
    BadRequest,
    InsufficientCapacity,
    MachineConfig,
    ServerError,
    Unauthorized,
    ValidationFailed,
)
from jobrunner.machines.create import SUBMIT_ID_KEY

from .conftest import MACHINES, FakeClock, load

CONFIG = {"image": "alpine", "metadata": {"jobrunner": "true"}}


class FakeFly:
    """Just enough of the Machines API to see how many machines really got created."""

    def __init__(self, router: respx.MockRouter) -> None:
        self.created: list[dict[str, Any]] = []
        self.visible = True  # False: list does not show new machines yet (eventual consistency)
        self.ignore_metadata_filter = False
        self.post = router.post(MACHINES)
        self.list = router.get(MACHINES).mock(side_effect=self._list)
        router.get(url__regex=rf"{MACHINES}/m\d+$").mock(side_effect=self._get)

    def on_post(self, answer: Callable[[httpx.Request, int], httpx.Response]) -> None:
        """Answer creates with ``answer(request, n)``, n counting tries from 1."""
        tries = iter(range(1, 1000))
        self.post.mock(side_effect=lambda request: answer(request, next(tries)))

    def create(self, request: httpx.Request) -> dict[str, Any]:
        body = json.loads(request.content)
        machine = {
            **load("machine_created"),
            "id": f"m{len(self.created)}",
            "config": body["config"],
            "created_at": f"2024-01-01T00:00:0{len(self.created)}Z",
        }
        self.created.append(machine)
        return machine

    def _list(self, request: httpx.Request) -> httpx.Response:
        if not self.visible:
            return httpx.Response(200, json=[])
        wanted = {
            key.removeprefix("metadata."): value
            for key, value in request.url.params.multi_items()
            if key.startswith("metadata.")
        }
        found = [
            m
            for m in self.created
            if self.ignore_metadata_filter
            or all(m["config"]["metadata"].get(k) == v for k, v in wanted.items())
        ]
        return httpx.Response(200, json=found)

    def _get(self, request: httpx.Request) -> httpx.Response:
        machine_id = request.url.path.rsplit("/", 1)[-1]
        for machine in self.created:
            if machine["id"] == machine_id:
                return httpx.Response(200, json={**machine, "state": "started"})
        return httpx.Response(404, json=load("error_404"))

    def submit_ids(self) -> list[str]:
        return [
            json.loads(c.request.content)["config"]["metadata"][SUBMIT_ID_KEY]
            for c in self.post.calls
        ]


@pytest.fixture
def fly(router: respx.MockRouter) -> FakeFly:
    return FakeFly(router)


async def test_dropped_connection_after_create_returns_that_machine(
    client: AsyncMachinesClient, fly: FakeFly
) -> None:
    def create_then_drop(request: httpx.Request, n: int) -> httpx.Response:
        fly.create(request)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    fly.on_post(create_then_drop)
    machine = await client.create_machine(CONFIG)
    assert len(fly.created) == 1  # exactly one create took effect
    assert fly.post.call_count == 1  # and it was not sent again
    assert machine.id == fly.created[0]["id"]
    assert machine.state == "started"  # fresh from a GET, not the stale list entry
    lookup = fly.list.calls.last.request.url.params
    assert lookup["include_deleted"] == "true"
    assert lookup[f"metadata.{SUBMIT_ID_KEY}"] == fly.submit_ids()[0]


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(httpx.Response(504, text="gateway timeout"), id="504"),
        pytest.param(httpx.Response(502), id="502"),
        pytest.param(httpx.Response(503, json={"error": "unavailable"}), id="503"),
        pytest.param(httpx.Response(500, json={"error": "internal"}), id="500"),
        pytest.param(httpx.Response(408, json={"error": "timed out"}), id="408"),
        pytest.param(httpx.ReadTimeout("timed out"), id="read-timeout"),
        pytest.param(httpx.ReadError("connection reset"), id="reset"),
    ],
)
async def test_ambiguous_failure_without_a_machine_creates_once_more(
    client: AsyncMachinesClient, fly: FakeFly, failure: httpx.Response | Exception
) -> None:
    def second_succeeds(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            if isinstance(failure, Exception):
                raise failure
            return failure
        return httpx.Response(200, json=fly.create(request))

    fly.on_post(second_succeeds)
    machine = await client.create_machine(CONFIG)
    assert fly.post.call_count == 2
    assert fly.list.call_count == 1
    assert len(fly.created) == 1
    assert machine.id == "m0"
    first, second = fly.submit_ids()
    assert first == second  # the re-create is the same submission


async def test_lookup_waits_for_the_backoff_first(
    client: AsyncMachinesClient, fly: FakeFly, clock: FakeClock
) -> None:
    seen_at: list[float] = []
    fly.post.mock(
        side_effect=[httpx.Response(503), httpx.Response(200, json=load("machine_created"))]
    )

    def note_time(request: httpx.Request) -> httpx.Response:
        seen_at.append(clock.now)
        return httpx.Response(200, json=[])

    fly.list.mock(side_effect=note_time)
    await client.create_machine(CONFIG)
    assert seen_at == [pytest.approx(0.15)]  # slept before looking, to let the list catch up


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (400, {"error": "invalid image"}, BadRequest),
        (422, load("error_422_name_taken"), ValidationFailed),
        (503, load("error_503_insufficient_capacity"), InsufficientCapacity),
        (409, load("error_503_insufficient_capacity"), InsufficientCapacity),
    ],
)
async def test_clear_refusals_are_raised_without_retry_or_lookup(
    client: AsyncMachinesClient,
    fly: FakeFly,
    clock: FakeClock,
    status: int,
    body: dict[str, Any],
    cls: type[Exception],
) -> None:
    fly.post.respond(status, json=body)
    with pytest.raises(cls):
        await client.create_machine(CONFIG)
    assert fly.post.call_count == 1
    assert fly.list.call_count == 0
    assert clock.sleeps == []


async def test_429_waits_and_creates_again_without_lookup(
    client: AsyncMachinesClient, fly: FakeFly, clock: FakeClock
) -> None:
    fly.post.mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "2"}, json={"error": "rate limited"}),
            httpx.Response(200, json=load("machine_created")),
        ]
    )
    await client.create_machine(CONFIG)
    assert fly.post.call_count == 2
    assert fly.list.call_count == 0
    assert clock.sleeps == [2.0]


async def test_connection_never_made_retries_without_lookup(
    client: AsyncMachinesClient, fly: FakeFly
) -> None:
    fly.post.mock(
        side_effect=[
            httpx.ConnectError("refused"),
            httpx.Response(200, json=load("machine_created")),
        ]
    )
    await client.create_machine(CONFIG)
    assert fly.post.call_count == 2
    assert fly.list.call_count == 0


async def test_attempts_run_out_with_a_note_naming_the_submit_id(
    client: AsyncMachinesClient, fly: FakeFly
) -> None:
    fly.post.respond(503, json={"error": "unavailable"})
    with pytest.raises(ServerError) as info:
        await client.create_machine(CONFIG)
    assert fly.post.call_count == 5
    assert fly.list.call_count == 5  # looked after every ambiguous try, the last one too
    submit_id = fly.submit_ids()[0]
    assert any(submit_id in note for note in info.value.__notes__)


async def test_last_lookup_still_finds_a_late_machine(
    client: AsyncMachinesClient, fly: FakeFly
) -> None:
    def create_on_last(request: httpx.Request, n: int) -> httpx.Response:
        if n == 5:
            fly.create(request)
        return httpx.Response(503)

    fly.on_post(create_on_last)
    machine = await client.create_machine(CONFIG)
    assert machine.id == "m0"
    assert len(fly.created) == 1


async def test_name_taken_after_an_ambiguous_try_is_our_machine(
    client: AsyncMachinesClient, fly: FakeFly
) -> None:
    fly.visible = False  # the list lags behind: the first lookup sees nothing

    def respond(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            fly.create(request)
            raise httpx.ReadTimeout("timed out")
        fly.visible = True
        return httpx.Response(422, json=load("error_422_name_taken"))

    fly.on_post(respond)
    machine = await client.create_machine(CONFIG, name="nightly-report")
    assert len(fly.created) == 1
    assert machine.id == "m0"
    assert fly.post.call_count == 2


async def test_lookup_checks_the_submit_id_itself(
    client: AsyncMachinesClient, fly: FakeFly
) -> None:
    other = {**load("machine_started"), "id": "m9"}
    other["config"] = {**other["config"], "metadata": {SUBMIT_ID_KEY: "someone-else"}}
    fly.created.append(other)
    fly.ignore_metadata_filter = True  # a server that ignores metadata.* in the query
    fly.post.mock(
        side_effect=[httpx.Response(502), httpx.Response(200, json=load("machine_created"))]
    )
    machine = await client.create_machine(CONFIG)
    assert machine.id != "m9"
    assert fly.post.call_count == 2


async def test_submit_ids_are_unique_and_metadata_is_kept(
    client: AsyncMachinesClient, fly: FakeFly
) -> None:
    fly.post.respond(json=load("machine_created"))
    config = MachineConfig.model_validate(CONFIG)
    await client.create_machine(config)
    await client.create_machine(config)
    await client.create_machine(
        {**CONFIG, "metadata": {"jobrunner": "true", SUBMIT_ID_KEY: "mine"}}
    )
    ids = fly.submit_ids()
    assert len(set(ids)) == 3
    assert ids[2] == "mine"  # a caller's own submit id is not overwritten
    for call in fly.post.calls:
        assert json.loads(call.request.content)["config"]["metadata"]["jobrunner"] == "true"
    assert config.metadata == {"jobrunner": "true"}


async def test_a_failed_lookup_says_the_create_may_have_happened(
    client: AsyncMachinesClient, fly: FakeFly
) -> None:
    fly.post.respond(503, json={"error": "unavailable"})
    fly.list.mock(side_effect=None, return_value=httpx.Response(401, json=load("error_401")))
    with pytest.raises(Unauthorized) as info:
        await client.create_machine(CONFIG)
    assert fly.post.call_count == 1  # not created again without knowing
    notes = " ".join(info.value.__notes__)
    assert fly.submit_ids()[0] in notes
    assert "503" in notes
