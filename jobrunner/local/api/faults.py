"""Fault injection for reliability tests: a share of API requests fail the ways Fly's can.

Configured by ``JOBRUNNER_LOCAL_FAULTS`` (JSON) at start, or at run time through
``POST /_admin/faults`` when the server runs in admin mode. Keys:

``rate_limit``         share of requests answered 429 ``{"error":"rate limited"}`` with Retry-After
``server_error``       share answered with a 5xx (``server_error_status``, default 503)
``delay``              every request waits a random 0..delay seconds first
``drop_after_create``  share of successful machine creates whose connection is dropped after the
                       machine exists (the client sees an error, the machine is there)
``seed``               seed for the random choices, so a test run repeats exactly
``match``              optional regex on ``"METHOD /path"``: only matching requests get faults
``retry_after``        seconds in the Retry-After header (default 1)

The rate limit and server error are decided before the request is handled, so nothing happens;
the dropped create is decided after, so it has happened.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["FaultConfig", "FaultInjector", "FaultMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SHARES = ("rate_limit", "server_error", "drop_after_create")
_MAX_DELAY = 60
_CREATE_PATH = re.compile(r"^/v1/apps/[^/]+/machines/?$")


@dataclass(frozen=True)
class FaultConfig:
    """Which faults to inject, and how often (shares are 0.0 to 1.0)."""

    rate_limit: float = 0.0
    server_error: float = 0.0
    delay: float = 0.0
    drop_after_create: float = 0.0
    seed: int | None = None
    match: str | None = None
    retry_after: int = 1
    server_error_status: int = 503

    @property
    def active(self) -> bool:
        return any((self.rate_limit, self.server_error, self.delay, self.drop_after_create))

    @classmethod
    def parse(cls, raw: str | bytes | dict[str, Any]) -> FaultConfig:
        """Parse the JSON form; ``ValueError`` naming the key when it is wrong."""
        data = json.loads(raw) if isinstance(raw, str | bytes) else raw
        if not isinstance(data, dict):
            raise ValueError('fault settings must be a JSON object, e.g. {"rate_limit": 0.2}')
        data = {key: value for key, value in data.items() if value is not None}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault setting(s) {unknown}: use {sorted(known)}")
        for key in (*_SHARES, "delay"):
            value = data.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"fault setting {key} must be a number >= 0, got {value!r}")
            if key in _SHARES and value > 1:
                raise ValueError(f"fault setting {key} is a share: use 0.0 to 1.0, got {value}")
            # A longer delay would hold every request past any client's timeout: the server
            # would look dead until restarted.
            if key == "delay" and value > _MAX_DELAY:
                raise ValueError(f"fault setting delay must be at most {_MAX_DELAY} s, got {value}")
        for key in ("seed", "retry_after", "server_error_status"):
            value = data.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"fault setting {key} must be an integer, got {value!r}")
        status = data.get("server_error_status", 503)
        if not 500 <= status <= 599:
            raise ValueError(f"server_error_status must be a 5xx code, got {status}")
        if data.get("match") is not None:
            try:
                re.compile(data["match"])
            except (re.error, TypeError) as exc:
                raise ValueError(
                    f"fault setting match is not a regular expression: {exc}"
                ) from None
        return cls(**data)


class FaultInjector:
    """The current fault settings and their random source (replaced together)."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self.configure(config or FaultConfig())

    def configure(self, config: FaultConfig) -> None:
        self.config = config
        self.random = random.Random(config.seed)


class FaultMiddleware:
    """ASGI middleware applying the injector's faults to API requests."""

    def __init__(self, app: ASGIApp, injector: FaultInjector, exempt: tuple[str, ...]) -> None:
        self._app = app
        self._injector = injector
        self._exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        config = self._injector.config
        path = scope.get("path", "")
        if scope["type"] != "http" or not config.active or path.startswith(self._exempt):
            await self._app(scope, receive, send)
            return
        method = scope["method"]
        if config.match and not re.search(config.match, f"{method} {path}"):
            await self._app(scope, receive, send)
            return
        rng = self._injector.random
        if config.delay:
            await asyncio.sleep(rng.uniform(0, config.delay))
        roll = rng.random()
        if roll < config.rate_limit:
            headers = [(b"retry-after", str(config.retry_after).encode())]
            await _send_json(send, 429, {"error": "rate limited"}, headers)
            return
        if roll < config.rate_limit + config.server_error:
            body = {"error": "injected fault: the local backend pretends to be failing"}
            await _send_json(send, config.server_error_status, body, [])
            return
        if (
            method == "POST"
            and _CREATE_PATH.match(path)
            and rng.random() < config.drop_after_create
        ):
            await self._drop_after(scope, receive, send)
            return
        await self._app(scope, receive, send)

    async def _drop_after(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request, then send only the status line and headers and end the connection.

        Returning without the body makes uvicorn close the connection: the client gets an
        incomplete response, as if the network failed after the server acted.
        """
        start: Message | None = None
        held: list[Message] = []

        async def hold(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            else:
                held.append(message)

        await self._app(scope, receive, hold)
        if start is None:
            return
        if not 200 <= start["status"] < 300:
            await send(start)
            for message in held:
                await send(message)
            return
        await send(start)  # headers promise a body that never comes


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
