"""Exceptions raised by the Machines client, and the one function that maps an HTTP answer to one.

    JobrunnerError                         (jobrunner.errors)
    └── MachinesError                      anything from talking to a Machines API
        ├── MachinesConnectionError        no HTTP answer: refused, reset, timed out
        ├── LeaseError                     lease envelope not "success", or a refresh lost the lease
        └── MachinesAPIError               an HTTP error answer (status_code, error, api_status,
            │                              request_id, method, path, retry_after)
            ├── BadRequest (400)
            │   └── ValidationFailed (422)
            ├── Unauthorized (401)
            ├── NotFound (404)
            │   └── MachineDestroyed       wait found the machine destroyed (.machine)
            ├── WaitTimeout (408)
            ├── Conflict (409)
            ├── RateLimited (429)
            ├── InsufficientCapacity       body status "insufficient_capacity", any HTTP code
            └── ServerError (5xx)

``str(exc)`` is one line: what failed, the API's own words, a hint on what to do, and the
``fly-request-id`` when the API sent one (Fly support asks for it). Only the URL path is kept,
never headers, so the token cannot leak into an exception.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self

import httpx

from jobrunner.errors import JobrunnerError

if TYPE_CHECKING:
    from jobrunner.machines.models import Machine

__all__ = [
    "BadRequest",
    "Conflict",
    "InsufficientCapacity",
    "LeaseError",
    "MachineDestroyed",
    "MachinesAPIError",
    "MachinesConnectionError",
    "MachinesError",
    "NotFound",
    "RateLimited",
    "ServerError",
    "Unauthorized",
    "ValidationFailed",
    "WaitTimeout",
    "error_from_response",
    "parse_retry_after",
]

# Non-JSON bodies (HTML from a proxy, say) are cut to this many characters in messages.
_BODY_PREVIEW = 300

# Hints for statuses without a class of their own, so these errors also say what to do.
_STATUS_HINTS = {
    403: (
        "the token may not do this; check that FLY_API_TOKEN grants access to this app and "
        "action (deploy tokens are limited)"
    ),
    412: (
        "the machine's state or version does not allow this now; get the machine again and "
        "retry with its current state and instance_id (current_version)"
    ),
}


class MachinesError(JobrunnerError):
    """Base class for every error from the Machines API client."""


class LeaseError(MachinesError):
    """A lease envelope's status was not "success", or a refresh came back with another nonce."""


class MachinesConnectionError(MachinesError):
    """No HTTP answer came back (connection refused or reset, DNS failure, timeout).

    ``request_sent`` is False only when the request certainly never reached the server (the
    connection was never made), so even a non-idempotent call may be repeated safely.
    """

    def __init__(
        self, *, method: str, path: str, host: str, reason: str, request_sent: bool, retryable: bool
    ) -> None:
        self.method = method
        self.path = path
        self.host = host
        self.reason = reason
        self.request_sent = request_sent
        self.retryable = retryable
        super().__init__(
            f"{method} {path}: no answer from {host} ({reason}); check the network and the API "
            "address (FLY_API_HOSTNAME for machines, FLY_API_BASE_URL for logs)"
        )

    @classmethod
    def from_httpx(cls, exc: httpx.TransportError, *, method: str, path: str, host: str) -> Self:
        """Wrap an httpx transport error (the caller raises it ``from exc``)."""
        never_sent = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
        transient = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return cls(
            method=method,
            path=path,
            host=host,
            reason=reason,
            request_sent=not isinstance(exc, never_sent),
            retryable=isinstance(exc, transient),
        )


class MachinesAPIError(MachinesError):
    """The API answered with a non-2xx status."""

    hint: ClassVar[str] = ""

    def __init__(
        self,
        *,
        status_code: int,
        method: str,
        path: str,
        error: str | None = None,
        api_status: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status_code = status_code
        self.method = method
        self.path = path
        self.error = error
        self.api_status = api_status
        self.request_id = request_id
        self.retry_after = retry_after
        super().__init__(self._describe())

    def _hint(self) -> str:
        return self.hint or _STATUS_HINTS.get(self.status_code, "")

    def _describe(self) -> str:
        line = f"{self.method} {self.path} failed with HTTP {self.status_code}"
        if self.error:
            line += f": {self.error}"
        if self.api_status:
            line += f" (status {self.api_status})"
        hint = self._hint()
        if hint:
            line += f"; {hint}"
        if self.request_id:
            line += f" [fly-request-id {self.request_id}]"
        return " ".join(line.split())  # one line, whatever the API put in its text


class BadRequest(MachinesAPIError):
    """400: the API rejected the request's parameters. Not retried."""

    hint = "the request parameters were rejected; fix them, retrying will not help"


class ValidationFailed(BadRequest):
    """422: the request body failed validation (e.g. status "name_taken")."""

    hint = "the request body failed validation; fix the named field (a taken name needs a new one)"


class Unauthorized(MachinesAPIError):
    """401: the token is missing, malformed, expired or lacks access to this app."""

    hint = (
        "the API token was refused; check FLY_API_TOKEN (or FLY_ACCESS_TOKEN, or the local "
        "backend's token) and that it grants access to this app"
    )


class NotFound(MachinesAPIError):
    """404: no such app or machine (or the machine is not visible yet right after create)."""

    hint = "check the app name (FLY_APP) and the machine id"


class MachineDestroyed(NotFound):
    """A wait found the machine already destroyed, so the wanted state can never come.

    ``machine`` is the machine as a GET returned it; for a one-off job its ``exit_code`` tells
    how the job ended.
    """

    def __init__(self, *, machine: Machine, wanted: Iterable[str], method: str, path: str) -> None:
        self.machine = machine
        self.wanted = tuple(wanted)
        code = machine.exit_code
        exit_text = f", exit code {code}" if code is not None else ""
        super().__init__(
            status_code=404,
            method=method,
            path=path,
            error=(
                f"machine {machine.id} is {machine.state}{exit_text} and will never be "
                f"{'/'.join(self.wanted)}"
            ),
        )

    def _hint(self) -> str:
        return "the machine already ran and was destroyed; read .machine for its exit code"


class WaitTimeout(MachinesAPIError):
    """408: the machine did not reach the wanted state in time."""

    hint = "the machine did not reach the wanted state in time; wait longer or check its logs"


class Conflict(MachinesAPIError):
    """409: someone else holds the machine's lease (or a version conflict)."""

    hint = "another client holds this machine's lease; pass its nonce or wait for it to expire"


class RateLimited(MachinesAPIError):
    """429: too many requests. ``retry_after``: the ``Retry-After`` header in seconds, if sent."""

    def _hint(self) -> str:
        if self.retry_after is not None:
            return f"rate limited by the API; retry after {self.retry_after:g} s"
        return "rate limited by the API; slow down and retry"


class InsufficientCapacity(MachinesAPIError):
    """The platform has no room for this machine (body status "insufficient_capacity")."""

    hint = "no capacity for this machine there; retry later, or pick another region or size"


class ServerError(MachinesAPIError):
    """5xx: a Fly platform error."""

    hint = "a Fly platform error; retry later, and quote the request id to Fly support"


_BY_STATUS: dict[int, type[MachinesAPIError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    408: WaitTimeout,
    409: Conflict,
    422: ValidationFailed,
    429: RateLimited,
}


def error_class_for(status_code: int, api_status: str | None) -> type[MachinesAPIError]:
    """The exception class for an HTTP status and the body's ``status`` field."""
    if api_status == "insufficient_capacity":
        return InsufficientCapacity
    if status_code in _BY_STATUS:
        return _BY_STATUS[status_code]
    if 500 <= status_code <= 599:
        return ServerError
    return MachinesAPIError


def error_from_response(
    status_code: int,
    body: bytes | str,
    headers: Mapping[str, str],
    *,
    method: str,
    path: str,
    now: float | None = None,
    redact: Iterable[str] = (),
) -> MachinesAPIError:
    """Turn a non-2xx answer into the most specific ``MachinesAPIError``.

    ``now`` (Unix seconds) turns an HTTP-date ``Retry-After`` into a delay. Every string in
    ``redact`` is blanked out of the API's text, in case a server echoes a credential back.
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    secrets = [secret for secret in redact if secret]
    # Blank the raw text before a long body is cut, so no piece of a token survives the cut;
    # and the parsed text again, in case JSON escaping hid the token from the first pass.
    for secret in secrets:
        text = text.replace(secret, "***")
    error, api_status = _parse_error_body(status_code, text)
    for secret in secrets:
        if error:
            error = error.replace(secret, "***")
    cls = error_class_for(status_code, api_status)
    return cls(
        status_code=status_code,
        method=method,
        path=path,
        error=error,
        api_status=api_status,
        request_id=lowered.get("fly-request-id"),
        retry_after=parse_retry_after(lowered.get("retry-after"), now=now),
    )


def _parse_error_body(status_code: int, text: str) -> tuple[str | None, str | None]:
    """(error text, API status) from a body; fly-go prefers "message" over "error"."""
    try:
        data: Any = json.loads(text) if text.strip() else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        message = data.get("message") or data.get("error")
        status = data.get("status")
        return (
            str(message) if message else None,
            status if isinstance(status, str) and status else None,
        )
    if not text.strip():
        return None, None
    preview = text.strip()
    if len(preview) > _BODY_PREVIEW:
        preview = preview[:_BODY_PREVIEW] + "..."
    return f"request returned non-2xx status: {status_code}: {preview}", None


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    A date needs ``now`` (Unix seconds); a date in the past means 0. Garbage means None.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN is garbage
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if now is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)
