"""The core every endpoint goes through: configuration, the HTTP pool, and ``_request``.

``_request`` is the one way a call is sent: rate limit (``ratelimit.py``), one HTTP exchange,
mapping of a failure to an exception (``errors.py``), and the retry policy (``retry.py``).
``AsyncMachinesClient`` (client.py) adds the endpoints on top.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.request
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any, Self

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from jobrunner import __version__
from jobrunner.errors import ConfigError
from jobrunner.machines._requests import Params, parse_json
from jobrunner.machines.clock import SYSTEM_CLOCK, Clock
from jobrunner.machines.config import ClientConfig
from jobrunner.machines.errors import MachinesConnectionError, error_from_response
from jobrunner.machines.ratelimit import Limiter, RateLimiter
from jobrunner.machines.retry import RequestRetryPolicy, is_transient, nothing_happened, retry_call

__all__ = ["NONCE_HEADER", "ClientBase", "default_transport"]

log = logging.getLogger("jobrunner.machines.client")

NONCE_HEADER = "fly-machine-lease-nonce"

# No cap on connections: every wait holds one open for up to 60 s, and a worker may wait on a
# thousand machines at once; a cap would starve every other call behind them.
_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=100)

# aiohttp's failures as httpx's own transport raises the same ones, most specific first.
# errors.py reads "never sent" from ConnectError/ConnectTimeout/PoolTimeout, so a reset or a
# hang-up after the request went out must not land there; httpx-aiohttp's own table maps every
# ClientConnectionError to ConnectTimeout and lets a bad status line escape unwrapped.
_AIOHTTP_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),  # connect, or wait for the pool
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),  # sock_read
    (aiohttp.ClientConnectorError, httpx.ConnectError),  # refused, DNS, TLS handshake
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),  # body cut short
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # not HTTP
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientConnectionError, httpx.ReadError),  # reset and other OS errors
    (aiohttp.ClientError, httpx.TransportError),
    (TimeoutError, httpx.ReadTimeout),
)


@contextlib.contextmanager
def _httpx_errors(request: httpx.Request) -> Iterator[None]:
    """Raise an aiohttp failure (bare, or as httpx-aiohttp wrapped it) as httpx would."""
    try:
        yield
    except httpx.TransportError as exc:
        cause = exc.__cause__
        if not isinstance(cause, aiohttp.ClientError | TimeoutError):
            raise
        raise _mapped(cause, request) from cause
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _mapped(exc, request) from exc


def _mapped(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    target = next(target for source, target in _AIOHTTP_ERRORS if isinstance(exc, source))
    # One line, as every MachinesError's text is: aiohttp's parser errors span several.
    return target(" ".join(str(exc).split()) or type(exc).__name__, request=request)


class _MappedStream(httpx.AsyncByteStream):
    """A response body whose read failures come out as httpx errors (see ``_httpx_errors``)."""

    def __init__(self, inner: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self._inner = inner
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors(self._request):
            async for chunk in self._inner:
                yield chunk

    async def aclose(self) -> None:
        with _httpx_errors(self._request):
            await self._inner.aclose()


class _AiohttpTransport(AiohttpTransport):
    """httpx-aiohttp's transport with an uncapped pool, no cookie jar of its own (httpx keeps
    the cookies) and aiohttp's failures raised as the httpx errors errors.py expects."""

    def get_client(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections or 0,  # 0: no limit (aiohttp's default is 100)
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _httpx_errors(request):
            response = await super().handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _MappedStream(response.stream, request)
        return response


def default_transport() -> httpx.AsyncBaseTransport:
    """The transport under the client when the caller gives none: aiohttp's HTTP/1.1 client.

    Measured against httpx's own (httpcore) transport it costs about half the client CPU
    per request one at a time and a fifth at 16 at once (bench/http_transport.py). Its aiohttp
    session is made on the first request, on the loop that sends it, and closed with the client.
    """
    return _AiohttpTransport(limits=_LIMITS)


def _proxy_in_environment() -> bool:
    """Whether HTTP(S)_PROXY/ALL_PROXY is set: httpx honours those only for its own transport."""
    return any(scheme in urllib.request.getproxies() for scheme in ("http", "https", "all"))


class ClientBase:
    """Configuration, connection pool and request sending shared by every endpoint method."""

    def __init__(
        self,
        app: str | None = None,
        *,
        token: str | None = None,
        base_url: str | None = None,
        logs_base_url: str | None = None,
        config: ClientConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RequestRetryPolicy | None = None,
        rate_limit: bool = True,
        timeout: float = 30.0,
        user_agent: str | None = None,
        clock: Clock | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self._config = (config or ClientConfig()).with_overrides(
            app=app, token=token, base_url=base_url, logs_base_url=logs_base_url
        )
        self._retry = retry or RequestRetryPolicy()
        self._clock = clock or SYSTEM_CLOCK
        # ``limiter`` replaces the in-process buckets, e.g. with buckets shared through the ledger.
        self._limiter: Limiter | None = None
        if rate_limit:
            self._limiter = limiter or RateLimiter(self._clock)
        self._timeout = timeout
        if transport is None and not _proxy_in_environment():
            transport = default_transport()
        # One pool for both APIs; its cookie jar keeps the API's affinity cookie between calls.
        # ``limits`` applies only when httpx builds its own transport (a proxy is configured).
        self._http = httpx.AsyncClient(
            transport=transport,
            timeout=timeout,
            limits=_LIMITS,
            headers={
                "User-Agent": user_agent or f"jobrunner/{__version__}",
                "Accept": "application/json",
            },
        )

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """A client configured from the environment (see ``ClientConfig.from_env``).

        Keyword arguments are passed to the constructor and win over the environment.
        """
        config = overrides.pop("config", None) or ClientConfig.from_env()
        return cls(config=config, **overrides)

    @property
    def config(self) -> ClientConfig:
        """The addresses, token holder and default app in use."""
        return self._config

    def __repr__(self) -> str:
        token = "set" if self._config.token else "none"
        return (
            f"{type(self).__name__}(app={self._config.app!r}, base_url={self._config.base_url!r}, "
            f"logs_base_url={self._config.logs_base_url!r}, token={token})"
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def _app(self, app: str | None) -> str:
        chosen = app or self._config.app
        if not chosen:
            raise ConfigError("no Fly app given: pass app=... or set FLY_APP")
        return chosen

    def _headers(self, nonce: str | None) -> dict[str, str]:
        headers: dict[str, str] = {}
        authorization = self._config.authorization
        if authorization is not None:
            headers["Authorization"] = authorization
        if nonce is not None:
            headers[NONCE_HEADER] = nonce
        return headers

    def _secrets(self) -> tuple[str, ...]:
        """What must be blanked out of any text taken from an answer: the token, and each
        macaroon of a "FlyV1 a,b" token on its own (a server may quote just one)."""
        token = self._config.token
        if not token:
            return ()
        value = token.reveal()
        bare = value.removeprefix("FlyV1 ").removeprefix("Bearer ")
        # Parts shorter than 8 characters are not secrets worth blanking everywhere they occur.
        parts = {p for p in (bare, *(part.strip() for part in bare.split(","))) if len(p) >= 8}
        # Longest first, so a part inside the whole token does not leave the rest behind.
        return tuple(sorted(parts | {value}, key=len, reverse=True))

    async def _json(self, method: str, path: str, *, what: str, **kwargs: Any) -> Any:
        """``_request`` and decode the JSON answer (None for an empty body)."""
        response = await self._request(method, path, **kwargs)
        return parse_json(response.content, what=what, redact=self._secrets())

    async def _request(
        self,
        method: str,
        path: str,
        *,
        action: str | None,
        scope: str,
        idempotent: bool = True,
        params: Params | None = None,
        json: Any = None,
        nonce: str | None = None,
        timeout: httpx.Timeout | None = None,
        logs_api: bool = False,
        retry: RequestRetryPolicy | None = None,
    ) -> httpx.Response:
        """Send one call with rate limiting and retries; return the 2xx response or raise.

        ``action`` names the rate-limit bucket (None: not limited) and ``scope`` the app or
        machine it counts against. ``idempotent`` picks the retry rule (see retry.py).
        """
        base = self._config.logs_base_url if logs_api else self._config.base_url
        headers = self._headers(nonce)

        async def once() -> httpx.Response:
            if self._limiter is not None and action is not None:
                await self._limiter.acquire(action, scope)
            return await self._exchange(method, base, path, params, json, headers, timeout)

        return await retry_call(
            once,
            policy=retry or self._retry,
            clock=self._clock,
            should_retry=is_transient if idempotent else nothing_happened,
            what=f"{method} {path}",
        )

    async def _exchange(
        self,
        method: str,
        base: str,
        path: str,
        params: Params | None,
        json: Any,
        headers: dict[str, str],
        timeout: httpx.Timeout | None,
    ) -> httpx.Response:
        """One HTTP request; a transport failure or non-2xx answer becomes a MachinesError."""
        log.debug("%s %s", method, path, extra={"action": "machines.request"})
        try:
            response = await self._http.request(
                method,
                base + path,
                params=tuple(params) if params else None,
                json=json,
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            host = httpx.URL(base).host
            raise MachinesConnectionError.from_httpx(
                exc, method=method, path=path, host=host
            ) from exc
        if response.is_success:
            return response
        raise error_from_response(
            response.status_code,
            response.content,
            response.headers,
            method=method,
            path=path,
            now=self._clock.time(),
            redact=self._secrets(),
        )
