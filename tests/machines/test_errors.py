"""The status -> exception mapping, error text, and how transport failures surface."""

from __future__ import annotations

import json

import httpx
import pytest
import respx

from jobrunner.errors import JobrunnerError
from jobrunner.machines import (
    AsyncMachinesClient,
    BadRequest,
    Conflict,
    InsufficientCapacity,
    MachineDestroyed,
    MachinesAPIError,
    MachinesConnectionError,
    MachinesError,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
    error_from_response,
)
from jobrunner.machines.errors import parse_retry_after
from jobrunner.machines.models import Machine

from .conftest import MACHINE_ID, MACHINES, load

STATUS_TABLE = [
    (400, BadRequest),
    (401, Unauthorized),
    (403, MachinesAPIError),
    (404, NotFound),
    (408, WaitTimeout),
    (409, Conflict),
    (412, MachinesAPIError),
    (422, ValidationFailed),
    (429, RateLimited),
    (500, ServerError),
    (502, ServerError),
    (503, ServerError),
    (504, ServerError),
]


@pytest.mark.parametrize(("status", "cls"), STATUS_TABLE)
def test_every_status_maps_to_its_class(status: int, cls: type[MachinesAPIError]) -> None:
    exc = error_from_response(
        status, b'{"error":"boom"}', {}, method="GET", path="/v1/apps/a/machines"
    )
    assert type(exc) is cls
    assert exc.status_code == status
    assert exc.error == "boom"
    assert isinstance(exc, JobrunnerError)


def test_tree_shape() -> None:
    assert issubclass(ValidationFailed, BadRequest)
    assert issubclass(MachineDestroyed, NotFound)
    assert issubclass(MachinesAPIError, MachinesError)
    assert issubclass(MachinesConnectionError, MachinesError)
    assert issubclass(MachinesError, JobrunnerError)


@pytest.mark.parametrize("status", [409, 412, 422, 500, 503])
def test_insufficient_capacity_wins_for_any_status(status: int) -> None:
    body = json.dumps(load("error_503_insufficient_capacity"))
    exc = error_from_response(status, body, {}, method="POST", path="/v1/apps/a/machines")
    assert type(exc) is InsufficientCapacity
    assert exc.api_status == "insufficient_capacity"
    assert exc.error == "out of capacity"


def test_fields_and_one_line_message_with_request_id() -> None:
    body = json.dumps(load("error_422_name_taken")).encode()
    exc = error_from_response(
        422,
        body,
        {"Fly-Request-Id": "01HREQ-abc", "content-type": "application/json"},
        method="POST",
        path="/v1/apps/a/machines",
    )
    assert isinstance(exc, ValidationFailed)
    assert exc.api_status == "name_taken"
    assert exc.request_id == "01HREQ-abc"
    assert (exc.method, exc.path) == ("POST", "/v1/apps/a/machines")
    text = str(exc)
    assert "\n" not in text
    assert "POST /v1/apps/a/machines" in text
    assert "422" in text
    assert "Name has already been taken" in text
    assert "name_taken" in text
    assert "01HREQ-abc" in text


def test_message_preferred_over_error() -> None:
    exc = error_from_response(
        400, b'{"error":"short","message":"the long story"}', {}, method="GET", path="/x"
    )
    assert exc.error == "the long story"


def test_non_json_body_is_reported_like_fly_go_and_truncated() -> None:
    html = "<html>" + "x" * 5000 + "</html>"
    exc = error_from_response(502, html, {}, method="GET", path="/v1/apps/a/machines")
    assert isinstance(exc, ServerError)
    assert exc.error is not None
    assert exc.error.startswith("request returned non-2xx status: 502: <html>")
    assert len(str(exc)) < 600
    assert exc.api_status is None


def test_multiline_api_text_still_gives_one_line() -> None:
    exc = error_from_response(500, "line one\nline two", {}, method="GET", path="/x")
    assert "\n" not in str(exc)


def test_unauthorized_says_which_token_to_check() -> None:
    body = json.dumps(load("error_401"))
    text = str(error_from_response(401, body, {}, method="GET", path="/v1/apps/a/machines"))
    assert "FLY_API_TOKEN" in text
    assert "token validation error" in text


@pytest.mark.parametrize(("status", "hint"), [(403, "FLY_API_TOKEN"), (412, "current_version")])
def test_statuses_without_a_class_still_say_what_to_do(status: int, hint: str) -> None:
    exc = error_from_response(status, b'{"error":"no"}', {}, method="POST", path="/x")
    assert type(exc) is MachinesAPIError
    assert hint in str(exc)


def test_rate_limited_carries_retry_after() -> None:
    exc = error_from_response(429, b"", {"Retry-After": "7"}, method="GET", path="/x")
    assert isinstance(exc, RateLimited)
    assert exc.retry_after == 7.0
    assert "7" in str(exc)


def test_redact_removes_an_echoed_secret() -> None:
    exc = error_from_response(
        400, b'{"error":"bad token sekrit"}', {}, method="GET", path="/x", redact=["sekrit"]
    )
    assert "sekrit" not in str(exc)


def test_redact_leaves_no_piece_of_a_token_cut_by_the_preview() -> None:
    secret = "fm2_" + "s3cr3t" * 10
    body = "<html>" + "x" * 280 + secret + "</html>"  # the 300-character cut falls inside it
    exc = error_from_response(502, body, {}, method="GET", path="/x", redact=[secret])
    assert "s3cr3t" not in str(exc)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        ("0.5", 0.5),
        ("-3", 0.0),
        ("Tue, 14 Nov 2023 22:13:30 GMT", 10.0),  # 10 s after now below
        ("Tue, 14 Nov 2023 22:13:00 GMT", 0.0),  # in the past
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    assert parse_retry_after(value, now=now) == expected


def test_machine_destroyed_names_the_exit_code() -> None:
    machine = Machine.model_validate(load("machine_destroyed"))
    exc = MachineDestroyed(machine=machine, wanted=["started"], method="GET", path="/p")
    assert exc.machine is machine
    assert exc.status_code == 404
    assert "exit code 3" in str(exc)
    assert "started" in str(exc)


@pytest.mark.parametrize(
    ("raised", "sent"),
    [
        (httpx.ConnectError("connection refused"), False),
        (httpx.ConnectTimeout("connect timed out"), False),
        (httpx.ReadTimeout("read timed out"), True),
        (httpx.RemoteProtocolError("server disconnected"), True),
        (httpx.ReadError("connection reset by peer"), True),
    ],
)
async def test_transport_errors_become_connection_errors(
    client: AsyncMachinesClient,
    router: respx.MockRouter,
    raised: httpx.TransportError,
    sent: bool,
) -> None:
    # POST signal is not idempotent: none of these is retried after a sent request.
    route = router.post(f"{MACHINES}/{MACHINE_ID}/signal").mock(side_effect=raised)
    with pytest.raises(MachinesConnectionError) as info:
        await client.signal_machine(MACHINE_ID, "SIGTERM")
    exc = info.value
    assert exc.__cause__ is raised
    assert exc.request_sent is sent
    assert "api.machines.dev" in str(exc)
    assert f"/machines/{MACHINE_ID}/signal" in str(exc)
    # Never sent: repeated until the attempts run out; sent: a single try.
    assert route.call_count == (1 if sent else 5)
