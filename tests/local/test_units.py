"""Pure pieces of the local backend: ids, parsing, schedule maths, the fake clock, log tokens."""

from __future__ import annotations

import asyncio
import ipaddress
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jobrunner.local.api.errors import ApiError
from jobrunner.local.api.faults import FaultConfig
from jobrunner.local.api.validate import parse_duration, parse_signal
from jobrunner.local.fleet import ids as ids
from jobrunner.local.fleet.clock import FakeClock
from jobrunner.local.fleet.records import image_ref_for
from jobrunner.local.fleet.schedule import INTERVALS, latest_due, next_due
from jobrunner.local.state.database import StateDatabase
from jobrunner.local.state.logstore import LogStore


def test_id_shapes() -> None:
    assert re.fullmatch(r"[0-9a-f]{14}", ids.machine_id())
    assert re.fullmatch(r"[a-z]+-[a-z]+-\d{4}", ids.machine_name())
    assert re.fullmatch(r"[0-9a-f]{12}", ids.lease_nonce())
    address = ipaddress.IPv6Address(ids.private_ip("my-app", "1857156b526dd8"))
    assert str(address).startswith("fdaa:")
    assert ids.private_ip("my-app", "1857156b526dd8") == ids.private_ip("my-app", "1857156b526dd8")


def test_ulids_are_unique_and_sort_in_creation_order() -> None:
    made = [ids.ulid() for _ in range(2000)]  # many share a millisecond
    assert len(set(made)) == len(made)
    assert made == sorted(made)
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", u) for u in made)


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("10s", 10.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), ("2.5s", 2.5),
     (5, 5.0), ("7", 7.0), (5_000_000_000, 5.0)],
)  # fmt: skip
def test_durations(given: object, seconds: float) -> None:
    assert parse_duration(given) == pytest.approx(seconds)


@pytest.mark.parametrize("given", ["soon", "10x", "", "-1s", -3, True, None, [1], "nan"])
def test_bad_durations_name_the_field(given: object) -> None:
    with pytest.raises(ApiError) as error:
        parse_duration(given, field="config.stop_config.timeout", status=422)
    assert error.value.http_status == 422
    assert "config.stop_config.timeout" in error.value.message


@pytest.mark.parametrize(("given", "number"), [("SIGTERM", 15), ("term", 15), (9, 9), ("2", 2)])
def test_signals_by_name_or_number(given: object, number: int) -> None:
    assert parse_signal(given) == number


@pytest.mark.parametrize("given", ["SIGNOPE", 999, True, None, 1.5])
def test_bad_signals(given: object) -> None:
    with pytest.raises(ApiError):
        parse_signal(given)


def test_schedule_intervals_count_from_creation() -> None:
    created = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    daily = INTERVALS["daily"]
    assert next_due(created, daily, None) == created + daily
    fired = created + 3 * daily
    assert next_due(created, daily, fired) == created + 4 * daily
    # a server that was down for a week fires once, for the latest due time
    assert latest_due(created, daily, created + timedelta(days=7, hours=5)) == created + 7 * daily
    assert INTERVALS["monthly"] == timedelta(days=30)
    assert INTERVALS["weekly"] == timedelta(days=7) and INTERVALS["hourly"] == timedelta(hours=1)


async def test_fake_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC))
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper("late", 60)), asyncio.create_task(sleeper("soon", 10))]
    await asyncio.sleep(0)
    clock.advance(30)
    await asyncio.sleep(0)
    assert woke == ["soon"]
    clock.advance(30)
    await asyncio.gather(*tasks)
    assert woke == ["soon", "late"]
    assert clock.now() == datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)


@pytest.mark.parametrize(
    ("image", "registry", "repository", "tag", "digest"),
    [
        ("ubuntu", "registry-1.docker.io", "library/ubuntu", "latest", None),
        ("org/app:v2", "registry-1.docker.io", "org/app", "v2", None),
        ("ghcr.io/org/app:v1@sha256:ab", "ghcr.io", "org/app", "v1", "sha256:ab"),
        ("localhost:5000/x", "localhost:5000", "x", "latest", None),
    ],
)
def test_image_refs(
    image: str, registry: str, repository: str, tag: str, digest: str | None
) -> None:
    ref = image_ref_for(image)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [('{"rate_limit": 1.5}', "share"), ('{"nope": 1}', "unknown"), ("[1]", "object"),
     ('{"delay": -1}', "delay"), ('{"delay": 1e300}', "at most 60"),
     ('{"server_error_status": 404}', "5xx")],
)  # fmt: skip
def test_fault_settings_are_checked(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultConfig.parse(raw)


def test_log_tokens_strictly_increase_and_survive_a_restart(tmp_path: Path) -> None:
    store = StateDatabase(tmp_path / "local.db")
    logs = LogStore(store)
    same_moment = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(3):
        logs.append("app", "m1", "local", "stdout", f"line {n}\n", same_moment)
    page = logs.page("app", instance="m1", region=None, next_token=None)
    tokens = [int(entry["id"]) for entry in page["data"]]
    assert tokens == sorted(set(tokens)) and len(tokens) == 3
    assert [e["attributes"]["message"] for e in page["data"]] == ["line 0", "line 1", "line 2"]
    store.close()
    reopened = LogStore(StateDatabase(tmp_path / "local.db"))
    reopened.append("app", "m1", "local", "stderr", "later", same_moment)
    after = reopened.page("app", instance="m1", region=None, next_token=str(tokens[-1]))
    [entry] = after["data"]
    assert int(entry["id"]) > tokens[-1] and entry["attributes"]["level"] == "error"
