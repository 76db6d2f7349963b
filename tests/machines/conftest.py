"""Shared fixtures: a fake clock, a respx router used as the client's transport, JSON fixtures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from jobrunner.machines import AsyncMachinesClient, Clock, RequestRetryPolicy

API = "https://api.machines.dev"
APP = "test-app"
MACHINES = f"{API}/v1/apps/{APP}/machines"
LOGS = f"https://api.fly.io/api/v1/apps/{APP}/logs"
TOKEN = "fm2_sekrit-token-value"
MACHINE_ID = "1857156b526dd8"

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str) -> Any:
    """A JSON fixture shaped like a real API answer."""
    return json.loads((FIXTURES / f"{name}.json").read_text())


class FakeClock(Clock):
    """Time that moves only when someone sleeps (or a test calls ``advance``)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.wall = 1_700_000_000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)  # still let other tasks run, as a real sleep would


# Jitter fixed at its middle so backoff delays are exact: equal jitter gives 0.75 x nominal.
FIXED_RETRY = RequestRetryPolicy(rng=lambda: 0.5)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def router() -> respx.MockRouter:
    return respx.MockRouter(assert_all_called=False, assert_all_mocked=True)


def make_client(router: respx.MockRouter, clock: Clock, **kwargs: Any) -> AsyncMachinesClient:
    """A client whose transport is the respx router (no patching, no network)."""
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("retry", FIXED_RETRY)
    kwargs.setdefault("rate_limit", False)
    return AsyncMachinesClient(
        APP, transport=httpx.MockTransport(router.async_handler), clock=clock, **kwargs
    )


@pytest.fixture
async def client(router: respx.MockRouter, clock: FakeClock) -> AsyncIterator[AsyncMachinesClient]:
    async with make_client(router, clock) as c:
        yield c


def sent_json(request: httpx.Request) -> Any:
    return json.loads(request.content) if request.content else None
