"""The default transport (httpx-aiohttp under httpx): chosen when none is given, talks to a
real socket on 127.0.0.1, and fails with the same httpx errors httpx's own transport raises."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import struct
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import httpx
import pytest
import respx

from jobrunner.machines import AsyncMachinesClient, MachinesConnectionError
from jobrunner.machines._base import _AiohttpTransport, _httpx_errors

from .conftest import APP, FIXED_RETRY, MACHINE_ID, MACHINES, TOKEN, FakeClock, load

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:] if line)
    lowered = {k.lower(): v for k, v in headers.items()}
    body = await reader.readexactly(int(lowered.get("content-length", "0")))
    return head[0], lowered, body


async def answer(writer: asyncio.StreamWriter, body: Any, *extra: str) -> None:
    data = json.dumps(body).encode()
    head = ["HTTP/1.1 200 OK", "Content-Type: application/json", f"Content-Length: {len(data)}"]
    writer.write(("\r\n".join([*head, *extra]) + "\r\n\r\n").encode() + data)
    await writer.drain()


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def open_client(base_url: str, **kwargs: Any) -> AsyncMachinesClient:
    kwargs.setdefault("retry", FIXED_RETRY)
    return AsyncMachinesClient(
        APP, token=TOKEN, base_url=base_url, rate_limit=False, clock=FakeClock(), **kwargs
    )


@pytest.fixture
async def no_warnings() -> AsyncIterator[list[warnings.WarningMessage]]:
    """Fails the test on any warning, "Unclosed client session" included."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
        gc.collect()
    assert [str(w.message) for w in caught] == []


async def test_the_default_transport_is_aiohttp(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    async with AsyncMachinesClient(APP, token=TOKEN) as client:
        transport = client._http._transport
        assert isinstance(transport, _AiohttpTransport)
        assert transport.limits.max_connections is None


async def test_a_proxy_in_the_environment_keeps_httpx_own_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # httpx honours HTTPS_PROXY only for the transport it builds itself.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    async with AsyncMachinesClient(APP, token=TOKEN) as client:
        assert not isinstance(client._http._transport, _AiohttpTransport)


async def test_a_given_transport_is_used_as_is() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
    async with AsyncMachinesClient(APP, token=TOKEN, transport=transport) as client:
        assert client._http._transport is transport


async def test_round_trip_cookies_and_no_cap_on_connections(
    no_warnings: list[warnings.WarningMessage],
) -> None:
    seen: list[dict[str, str]] = []
    waiting: set[int] = set()
    all_in = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line, headers, _ = await read_request(reader)
                seen.append(headers)
                assert line == f"GET /v1/apps/{APP}/machines/{MACHINE_ID} HTTP/1.1"
                if len(seen) > 1:  # held open, as a long-poll is, until all 120 are in
                    waiting.add(id(writer))
                    if len(waiting) == 120:
                        all_in.set()
                    await asyncio.wait_for(all_in.wait(), 10)
                await answer(writer, load("machine_started"), "Set-Cookie: affinity=host42")
        except asyncio.IncompleteReadError:
            writer.close()

    server, base = await serve(handler)
    async with server:
        client = await open_client(base)
        async with client:
            await client.get_machine(MACHINE_ID)
            # 120 at once: more than aiohttp's default cap of 100 connections per session.
            await asyncio.gather(*(client.get_machine(MACHINE_ID) for _ in range(120)))
            assert len(waiting) == 120  # each on a connection of its own, none queued
            session = client._http._transport.client  # type: ignore[attr-defined]
            assert isinstance(session, aiohttp.ClientSession)
        assert session.closed
    assert seen[0]["authorization"] == f"Bearer {TOKEN}"
    assert seen[0]["user-agent"].startswith("jobrunner/")
    assert "cookie" not in seen[0]
    # httpx's jar alone sends the cookie back: once, not also from an aiohttp jar.
    assert all(h["cookie"] == "affinity=host42" for h in seen[1:])


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.close()


async def _reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    await writer.drain()
    writer.close()


async def _short_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}")
    await writer.drain()
    writer.close()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(10)
    writer.close()


@pytest.mark.parametrize(
    ("handler", "error"),
    [
        (_hang_up, httpx.RemoteProtocolError),
        (_reset, httpx.ReadError),
        (_not_http, httpx.RemoteProtocolError),
        (_short_body, httpx.RemoteProtocolError),
        (_silent, httpx.ReadTimeout),
    ],
)
async def test_failures_after_sending_are_not_repeated(
    handler: Handler, error: type[httpx.TransportError], no_warnings: list[Any]
) -> None:
    server, base = await serve(handler)
    async with server, await open_client(base, timeout=0.3) as client:
        with pytest.raises(MachinesConnectionError) as info:
            await client.signal_machine(MACHINE_ID, "SIGTERM")  # POST: not idempotent
    exc = info.value
    assert type(exc.__cause__) is error
    assert exc.request_sent is True
    assert exc.retryable is True
    assert "\n" not in str(exc)


async def test_refused_is_never_sent_and_repeated(no_warnings: list[Any]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with await open_client(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(MachinesConnectionError) as info:
            await client.signal_machine(MACHINE_ID, "SIGTERM")
    assert type(info.value.__cause__) is httpx.ConnectError
    assert info.value.request_sent is False
    assert len(client._clock.sleeps) == FIXED_RETRY.max_attempts - 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (aiohttp.ConnectionTimeoutError("connect"), httpx.ConnectTimeout),
        (aiohttp.SocketTimeoutError("read"), httpx.ReadTimeout),
        (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
        (aiohttp.ClientOSError(104, "reset"), httpx.ReadError),
        (aiohttp.InvalidURL("nope"), httpx.UnsupportedProtocol),
        (TimeoutError(), httpx.ReadTimeout),
    ],
)
@pytest.mark.parametrize("wrapped", [False, True])
def test_aiohttp_errors_map_like_httpx(
    raised: BaseException, expected: type[httpx.TransportError], wrapped: bool
) -> None:
    """Bare, or already turned into httpx-aiohttp's (wrong) choice: mapped from the cause."""
    request = httpx.Request("POST", f"{MACHINES}/{MACHINE_ID}/signal")
    with pytest.raises(httpx.TransportError) as info, _httpx_errors(request):
        if wrapped:
            raise httpx.ConnectTimeout("as httpx-aiohttp maps it") from raised
        raise raised
    assert type(info.value) is expected
    assert info.value.__cause__ is raised
    assert info.value.request is request


async def test_respx_mock_intercepts_with_using_httpx() -> None:
    """respx patches httpcore by default, which this transport bypasses; ``using="httpx"``
    patches httpx's client instead and so catches any transport."""
    async with respx.mock(using="httpx", assert_all_called=True) as mock:
        mock.get(f"{MACHINES}/{MACHINE_ID}").respond(200, json=load("machine_started"))
        async with AsyncMachinesClient(APP, token=TOKEN) as client:
            machine = await client.get_machine(MACHINE_ID)
    assert machine.id == MACHINE_ID
