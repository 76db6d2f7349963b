"""HTTP: the Machines API routes, authentication, request ids and error bodies (starlette).

Handlers are thin: they read path, query, headers and body, call ``MachineService`` and turn the
result into JSON. Every error leaves as Fly's body, ``{"error": "..."}``: ``ApiError`` with its
status, unknown routes as 404 (``/exec`` and ``/ps`` are not implemented and land here too), and
anything unexpected as 500 with the details in the server log, never a bare traceback.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from jobrunner.local.api.errors import ApiError, bad_request
from jobrunner.local.api.faults import (
    ASGIApp,
    FaultConfig,
    FaultMiddleware,
    Message,
    Receive,
    Scope,
    Send,
)
from jobrunner.local.api.validate import parse_body, parse_bool, parse_json_object
from jobrunner.local.api.waiting import parse_wait_query, wait_until_state
from jobrunner.local.fleet import ids as ids
from jobrunner.local.fleet.clock import FakeClock
from jobrunner.local.fleet.leases import NONCE_HEADER
from jobrunner.local.fleet.volumes import volume_routes
from jobrunner.machines.models import (
    CreateAppRequest,
    CreateMachineRequest,
    SignalRequest,
    StopRequest,
    UpdateMachineRequest,
)

if TYPE_CHECKING:
    from jobrunner.local.backend import LocalBackend

__all__ = ["MAX_BODY_BYTES", "build_app"]

logger = logging.getLogger("jobrunner.local")

UNAUTHENTICATED = {"error": "Authenticate: token validation error"}
# The largest request body taken (docs/local-backend.md, "Limits"): a machine config with its
# files (each at most validate.MAX_FILE_BYTES) fits; a refused body is read and dropped up to
# MAX_DRAINED_BYTES so the client sees the 413, then the connection is closed.
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_DRAINED_BYTES = 256 * 1024 * 1024
_OPEN_PATHS = ("/healthz",)
_MACHINE = "/v1/apps/{app}/machines/{machine_id}"


def build_app(backend: LocalBackend) -> ASGIApp:
    """The complete ASGI application: auth -> faults -> routes."""
    api = _Api(backend)
    routes = [
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/v1/apps", api.list_apps, methods=["GET"]),
        Route("/v1/apps", api.create_app, methods=["POST"]),
        Route("/v1/apps/{app}", api.get_app, methods=["GET"]),
        Route("/v1/apps/{app}", api.delete_app, methods=["DELETE"]),
        Route("/v1/apps/{app}/machines", api.list_machines, methods=["GET"]),
        Route("/v1/apps/{app}/machines", api.create_machine, methods=["POST"]),
        Route(_MACHINE, api.get_machine, methods=["GET"]),
        Route(_MACHINE, api.update_machine, methods=["POST"]),
        Route(_MACHINE, api.delete_machine, methods=["DELETE"]),
        Route(_MACHINE + "/start", api.start, methods=["POST"]),
        Route(_MACHINE + "/stop", api.stop, methods=["POST"]),
        Route(_MACHINE + "/suspend", api.suspend, methods=["POST"]),
        Route(_MACHINE + "/restart", api.restart, methods=["POST"]),
        Route(_MACHINE + "/signal", api.signal, methods=["POST"]),
        Route(_MACHINE + "/wait", api.wait, methods=["GET"]),
        Route(_MACHINE + "/events", api.events, methods=["GET"]),
        Route(_MACHINE + "/versions", api.versions, methods=["GET"]),
        Route(_MACHINE + "/lease", api.get_lease, methods=["GET"]),
        Route(_MACHINE + "/lease", api.acquire_lease, methods=["POST"]),
        Route(_MACHINE + "/lease", api.release_lease, methods=["DELETE"]),
        Route(_MACHINE + "/cordon", api.cordon, methods=["POST"]),
        Route(_MACHINE + "/uncordon", api.uncordon, methods=["POST"]),
        Route(_MACHINE + "/metadata", api.get_metadata, methods=["GET"]),
        Route(_MACHINE + "/metadata/{key}", api.set_metadata, methods=["POST"]),
        Route(_MACHINE + "/metadata/{key}", api.delete_metadata, methods=["DELETE"]),
        Route("/api/v1/apps/{app}/logs", api.logs, methods=["GET"]),
        *volume_routes(backend.service.volumes),
    ]
    if backend.settings.admin:
        routes += [
            Route("/_admin/faults", api.set_faults, methods=["POST"]),
            Route("/_admin/clock", api.advance_clock, methods=["POST"]),
        ]
    starlette = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        lifespan=backend.lifespan,
    )
    faulty = FaultMiddleware(starlette, backend.faults, exempt=("/healthz", "/_admin"))
    return _RequestId(_TokenAuth(_BodyLimit(faulty), backend.settings.token))


class _Api:
    """The endpoint functions (one per route)."""

    def __init__(self, backend: LocalBackend) -> None:
        self._backend = backend
        self._service = backend.service

    async def healthz(self, request: Request) -> Response:
        return _json(self._backend.health())

    # apps
    async def list_apps(self, request: Request) -> Response:
        return _json(self._service.list_apps(request.query_params.get("org_slug")))

    async def create_app(self, request: Request) -> Response:
        body = parse_body(await request.body(), CreateAppRequest)
        return _json(self._service.create_app(body), 201)

    async def get_app(self, request: Request) -> Response:
        return _json(self._service.get_app(_path(request, "app")))

    async def delete_app(self, request: Request) -> Response:
        await self._service.delete_app(_path(request, "app"))
        return Response(status_code=202)

    # machines
    async def list_machines(self, request: Request) -> Response:
        query = request.query_params
        metadata = {k[len("metadata.") :]: v for k, v in query.items() if k.startswith("metadata.")}
        machines = self._service.list_machines(
            _path(request, "app"),
            include_deleted=parse_bool(query.get("include_deleted"), field="include_deleted"),
            region=query.get("region") or None,
            metadata=metadata,
        )
        return _json(machines)

    async def create_machine(self, request: Request) -> Response:
        body = parse_body(await request.body(), CreateMachineRequest)
        return _json(self._service.create_machine(_path(request, "app"), body))

    async def get_machine(self, request: Request) -> Response:
        app, machine_id = _ids(request)
        return _json(self._service.get_machine(app, machine_id))

    async def update_machine(self, request: Request) -> Response:
        body = parse_body(await request.body(), UpdateMachineRequest)
        app, machine_id = _ids(request)
        return _json(await self._service.update_machine(app, machine_id, body, _nonce(request)))

    async def delete_machine(self, request: Request) -> Response:
        app, machine_id = _ids(request)
        query = request.query_params
        force = parse_bool(query.get("force"), field="force") or parse_bool(
            query.get("kill"), field="kill"
        )
        await self._service.destroy(app, machine_id, force=force, nonce=_nonce(request))
        return _json({"ok": True})

    async def start(self, request: Request) -> Response:
        app, machine_id = _ids(request)
        return _json(await self._service.start(app, machine_id, _nonce(request)))

    async def stop(self, request: Request) -> Response:
        body = parse_body(await request.body(), StopRequest, required=False)
        app, machine_id = _ids(request)
        await self._service.stop(app, machine_id, body.signal, body.timeout, _nonce(request))
        return _json({"ok": True})

    async def suspend(self, request: Request) -> Response:
        app, machine_id = _ids(request)
        await self._service.suspend(app, machine_id, _nonce(request))
        return _json({"ok": True})

    async def restart(self, request: Request) -> Response:
        app, machine_id = _ids(request)
        query = request.query_params
        await self._service.restart(
            app,
            machine_id,
            sig=query.get("signal") or None,
            timeout=query.get("timeout") or None,
            force_stop=parse_bool(query.get("force_stop"), field="force_stop"),
            nonce=_nonce(request),
        )
        return _json({"ok": True})

    async def signal(self, request: Request) -> Response:
        body = parse_body(await request.body(), SignalRequest)
        app, machine_id = _ids(request)
        self._service.signal(app, machine_id, body.signal)
        return _json({"ok": True})

    async def wait(self, request: Request) -> Response:
        app, machine_id = _ids(request)
        query = request.query_params
        wait = parse_wait_query(
            query.getlist("state"),
            query.get("timeout"),
            query.get("instance_id"),
            query.get("version"),
            query.get("from_event_id"),
        )
        machine = self._backend.registry.machine(app, machine_id)
        await wait_until_state(self._backend.registry, machine, wait)
        return _json({"ok": True})

    async def events(self, request: Request) -> Response:
        return _json(self._service.events(*_ids(request)))

    async def versions(self, request: Request) -> Response:
        return _json(self._service.versions(*_ids(request)))

    # leases
    async def get_lease(self, request: Request) -> Response:
        return _json(self._service.get_lease(*_ids(request)))

    async def acquire_lease(self, request: Request) -> Response:
        app, machine_id = _ids(request)
        body = parse_json_object(await request.body(), required=False)
        ttl = _lease_ttl(request.query_params.get("ttl"), body.get("ttl"))
        description = body.get("description") or ""
        if not isinstance(description, str):
            raise bad_request("description must be a string")
        lease = self._service.acquire_lease(
            app, machine_id, ttl=ttl, description=description, nonce=_nonce(request)
        )
        return _json(lease, 201)

    async def release_lease(self, request: Request) -> Response:
        app, machine_id = _ids(request)
        return _json(self._service.release_lease(app, machine_id, _nonce(request)))

    # cordon and metadata
    async def cordon(self, request: Request) -> Response:
        app, machine_id = _ids(request)
        self._service.cordon(app, machine_id, _nonce(request), cordoned=True)
        return _json({"ok": True})

    async def uncordon(self, request: Request) -> Response:
        app, machine_id = _ids(request)
        self._service.cordon(app, machine_id, _nonce(request), cordoned=False)
        return _json({"ok": True})

    async def get_metadata(self, request: Request) -> Response:
        return _json(self._service.get_metadata(*_ids(request)))

    async def set_metadata(self, request: Request) -> Response:
        app, machine_id = _ids(request)
        body = parse_json_object(await request.body(), required=True)
        value = body.get("value")
        if not isinstance(value, str):
            raise bad_request('metadata must be sent as {"value": "<string>"}')
        self._service.set_metadata(app, machine_id, _path(request, "key"), value)
        return Response(status_code=204)

    async def delete_metadata(self, request: Request) -> Response:
        app, machine_id = _ids(request)
        self._service.set_metadata(app, machine_id, _path(request, "key"), None)
        return Response(status_code=204)

    # logs
    async def logs(self, request: Request) -> Response:
        app = _path(request, "app")
        self._backend.registry.app(app)
        query = request.query_params
        page = self._backend.logs.page(
            app,
            instance=query.get("instance") or None,
            region=query.get("region") or None,
            next_token=query.get("next_token"),
        )
        return _json(page)

    # admin (only routed in admin mode)
    async def set_faults(self, request: Request) -> Response:
        # Decoded like every other body, so malformed or absurdly nested JSON is a 400, not a 500.
        settings = parse_json_object(await request.body(), required=True)
        try:
            config = FaultConfig.parse(settings)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        self._backend.faults.configure(config)
        logger.warning("fault injection set to %s", config)
        return _json({"ok": True, "faults": config.__dict__})

    async def advance_clock(self, request: Request) -> Response:
        clock = self._backend.clock
        if not isinstance(clock, FakeClock):
            raise ApiError(409, "the server runs on the real clock: start it with --fake-clock")
        body = parse_json_object(await request.body(), required=True)
        seconds = body.get("advance")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise bad_request('send {"advance": <seconds, 0 or more>}')
        now = clock.advance(float(seconds))
        self._backend.scheduler.tick()
        return _json({"now": now.isoformat()})


class _SafeJSONResponse(JSONResponse):
    """JSON that always renders: a stored string that UTF-8 cannot encode (a lone surrogate,
    which requests are refused for, but a record written before that check may hold one) is
    sent ``\\u``-escaped, and a non-finite float as null, instead of failing every read."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except (UnicodeEncodeError, ValueError):
            logger.warning("an answer held text or numbers JSON cannot carry; sent escaped")
            text = json.dumps(_finite(content), ensure_ascii=True, separators=(",", ":"))
            return text.encode("ascii")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json(content: Any, status: int = 200) -> Response:
    return _SafeJSONResponse(content, status_code=status)


def _path(request: Request, name: str) -> str:
    return str(request.path_params[name])


def _ids(request: Request) -> tuple[str, str]:
    return _path(request, "app"), _path(request, "machine_id")


def _nonce(request: Request) -> str | None:
    return request.headers.get(NONCE_HEADER) or None


def _lease_ttl(query_ttl: str | None, body_ttl: object) -> int | None:
    """The lease TTL from the query (fly-go) or the body (DOC/SW)."""
    if query_ttl:
        try:
            return int(query_ttl)
        except ValueError:
            raise bad_request(f"ttl {query_ttl!r} must be a whole number of seconds") from None
    if body_ttl is None:
        return None
    if isinstance(body_ttl, bool) or not isinstance(body_ttl, int):
        raise bad_request("ttl must be a whole number of seconds")
    return body_ttl


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.http_status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = (
            f"not found: {request.method} {request.url.path} is not an endpoint of the local "
            "backend (see docs/local-backend.md for the endpoints it implements)"
        )
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
        # Starlette's allow header names only the first route matching the path; a path served
        # by several routes (one per method) takes all of their methods.
        allowed = _allowed_methods(request)
        if allowed:
            return JSONResponse(
                {"error": message}, status_code=405, headers={"allow": ", ".join(allowed)}
            )
    else:
        message = str(exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on the request's path (HEAD wherever GET is)."""
    methods: set[str] = set()
    router = request.scope.get("router")
    for route in getattr(router, "routes", []):
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches({**request.scope, "method": "GET", "type": "http"})
            if match is not Match.NONE:
                methods |= route.methods
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    body = {"error": f"internal error of the local backend ({type(exc).__name__}); see server.log"}
    return JSONResponse(body, status_code=500)


class _BodyLimit:
    """Refuses request bodies over ``MAX_BODY_BYTES`` with 413, counting bytes as they arrive.

    A body announced larger (``Content-Length``) is refused before any of it is read; one that
    turns out larger while read (chunked) is refused as soon as it passes the limit, so the
    server never holds more than the limit of one body. Either way the rest is read and thrown
    away (up to ``MAX_DRAINED_BYTES``) before answering, so that the client, still sending, gets
    the 413 instead of a reset connection; beyond that the connection is closed.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self._app = app
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        announced = _content_length(scope)
        if announced is not None and announced > self._limit:
            await _drain(receive, 0)
            await _send_too_large(send, self._limit)
            return
        received = 0

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._limit:
                    if message.get("more_body", False):
                        await _drain(receive, received)
                    raise ApiError(413, _too_large_message(self._limit))
            return message

        await self._app(scope, counting, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value[:20])
            except ValueError:
                return None
    return None


async def _drain(receive: Receive, received: int) -> None:
    """Read and drop the rest of a refused body (at most MAX_DRAINED_BYTES in all)."""
    while received <= MAX_DRAINED_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _too_large_message(limit: int) -> str:
    return (
        f"request body larger than {limit // 1048576} MiB, the local backend's limit: send "
        "less (large files belong in the image or a volume, not in config.files)"
    )


async def _send_too_large(send: Send, limit: int) -> None:
    body = json.dumps({"error": _too_large_message(limit)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _TokenAuth:
    """Every request but /healthz needs ``Authorization: Bearer <token>`` (or ``FlyV1 <token>``)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, presented = header.partition(b" ")
            valid = scheme.lower() in (b"bearer", b"flyv1") and hmac.compare_digest(
                presented.strip(), self._token
            )
            if not valid:
                response = JSONResponse(UNAUTHENTICATED, status_code=401)
                await response(scope, receive, send)
                return
        await self._app(scope, receive, send)


class _RequestId:
    """Adds a ``fly-request-id`` header to every answer, as Fly's API does."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request_id = ids.request_id().encode()

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"fly-request-id", request_id)]
            await send(message)

        await self._app(scope, receive, with_id)
