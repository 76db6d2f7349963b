"""Machine.exit_code: the newest exit after the newest start, from either place the API puts it."""

from __future__ import annotations

from typing import Any

import pytest

from jobrunner.machines import Machine

from .conftest import load


def machine(*events: dict[str, Any]) -> Machine:
    return Machine.model_validate({"id": "m1", "state": "destroyed", "events": list(events)})


def start(ts: int) -> dict[str, Any]:
    return {"type": "start", "status": "started", "source": "flyd", "timestamp": ts}


def exit_(ts: int, request: dict[str, Any] | None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "exit", "status": "stopped", "source": "flyd", "timestamp": ts}
    if request is not None:
        event["request"] = request
    return event


def test_exit_code_in_request_exit_event() -> None:
    m = Machine.model_validate(load("machine_destroyed"))
    assert m.exit_code == 3


def test_exit_code_in_monitor_event() -> None:
    m = Machine.model_validate(load("machine_destroyed_monitor_event"))
    assert m.exit_code == 137
    details = m.exit_event()
    assert details is not None and details.oom_killed is True


def test_monitor_event_wins_when_both_are_there() -> None:
    request = {"exit_event": {"exit_code": 1}, "MonitorEvent": {"exit_event": {"exit_code": 2}}}
    assert machine(exit_(200, request), start(100)).exit_code == 2


def test_newest_exit_after_newest_start() -> None:
    m = machine(
        exit_(300, {"exit_event": {"exit_code": 5}}),
        start(200),
        exit_(100, {"exit_event": {"exit_code": 1}}),
        start(50),
    )
    assert m.exit_code == 5


def test_order_of_events_does_not_matter() -> None:
    m = machine(
        start(50),
        exit_(100, {"exit_event": {"exit_code": 1}}),
        start(200),
        exit_(300, {"exit_event": {"exit_code": 5}}),
    )
    assert m.exit_code == 5


@pytest.mark.parametrize(
    "request_", [None, {}, {"exit_event": {}}, {"exit_event": {"oom_killed": False}}]
)
def test_missing_exit_code_key_means_zero(request_: dict[str, Any] | None) -> None:
    assert machine(exit_(200, request_), start(100)).exit_code == 0


def test_no_exit_after_the_last_start_is_none() -> None:
    m = machine(start(300), exit_(200, {"exit_event": {"exit_code": 1}}), start(100))
    assert m.exit_code is None
    assert machine().exit_code is None
    assert Machine.model_validate(load("machine_started")).exit_code is None
