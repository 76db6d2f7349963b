"""The one exception the API handlers raise to answer with a Fly-style error body."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "bad_request",
    "conflict",
    "not_found",
    "precondition_failed",
    "unprocessable",
]


class ApiError(Exception):
    """An HTTP error answer: ``{"error": message}`` plus ``"status"`` when Fly sends one.

    ``fly_status`` is Fly's machine-readable code (``name_taken``, ``insufficient_capacity``...);
    it is left out of the body when None, as Fly does for most errors.
    """

    def __init__(
        self,
        http_status: int,
        message: str,
        *,
        fly_status: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message
        self.fly_status = fly_status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of the error answer."""
        body: dict[str, Any] = {"error": self.message}
        if self.fly_status is not None:
            body["status"] = self.fly_status
        return body


def bad_request(message: str) -> ApiError:
    """400: the request itself is malformed (JSON syntax, types, query parameters)."""
    return ApiError(400, message)


def unprocessable(message: str) -> ApiError:
    """422: well-formed but invalid (Fly's "Validation failed")."""
    return ApiError(422, message)


def not_found(message: str) -> ApiError:
    """404: no such app or machine (or the machine was destroyed, for actions)."""
    return ApiError(404, message)


def conflict(message: str) -> ApiError:
    """409: someone else holds the machine's lease."""
    return ApiError(409, message)


def precondition_failed(message: str) -> ApiError:
    """412: the machine is not in a state that allows the action (or a stale current_version)."""
    return ApiError(412, message)
