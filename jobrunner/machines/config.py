"""Where the client finds its API addresses, token and app, and how the token is kept secret.

Environment variables (names follow flyctl and the Fly docs):

* ``FLY_API_TOKEN`` (else ``FLY_ACCESS_TOKEN``): the API token. None: no Authorization header
  (fine for a local backend that does not check).
* ``FLY_API_HOSTNAME`` (else ``FLY_FLAPS_BASE_URL``): the Machines API base, without ``/v1``
  (a trailing ``/v1`` or ``/`` is dropped). Default ``https://api.machines.dev``.
* ``FLY_API_BASE_URL``: the base of the logs API. Default ``https://api.fly.io``.
* ``FLY_APP``: the default app for machine calls.

The token is held in a ``Secret``, whose ``repr``/``str`` never show it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from jobrunner.errors import ConfigError

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_LOGS_BASE_URL",
    "ClientConfig",
    "Secret",
    "authorization_header",
    "normalize_base_url",
]

DEFAULT_BASE_URL = "https://api.machines.dev"
DEFAULT_LOGS_BASE_URL = "https://api.fly.io"

# Tokens already carrying one of these schemes are sent as they are (macaroons come as "FlyV1 ...").
_SCHEMES = ("FlyV1 ", "Bearer ")


class Secret:
    """A string that never shows itself in ``repr``/``str``; ``reveal()`` is the only way in."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    def __str__(self) -> str:
        return "********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def authorization_header(token: str) -> str:
    """The Authorization value: "FlyV1 ..." and "Bearer ..." unchanged, anything else as Bearer."""
    token = token.strip()
    if token.startswith(_SCHEMES):
        return token
    return f"Bearer {token}"


def normalize_base_url(value: str, *, name: str, strip_v1: bool = False) -> str:
    """Check a base URL and drop a trailing ``/`` (and ``/v1`` for the Machines API)."""
    url = value.strip().rstrip("/")
    if strip_v1 and url.endswith("/v1"):
        url = url[: -len("/v1")].rstrip("/")
    if not url.startswith(("http://", "https://")) or url in ("http:", "https:"):
        raise ConfigError(
            f"{name}={value!r} is not an http(s) URL; set it like https://api.machines.dev"
        )
    return url


@dataclass(frozen=True)
class ClientConfig:
    """Everything the client needs besides behaviour knobs: addresses, token and default app."""

    token: Secret | None = None
    base_url: str = DEFAULT_BASE_URL
    logs_base_url: str = DEFAULT_LOGS_BASE_URL
    app: str | None = None

    def __post_init__(self) -> None:
        # Normalise here too so a hand-built config behaves like one from the environment.
        base = normalize_base_url(self.base_url, name="base_url", strip_v1=True)
        logs = normalize_base_url(self.logs_base_url, name="logs_base_url")
        object.__setattr__(self, "base_url", base)
        object.__setattr__(self, "logs_base_url", logs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientConfig:
        """Read the variables in this module's docstring (``environ`` defaults to os.environ)."""
        env = os.environ if environ is None else environ
        token = (env.get("FLY_API_TOKEN") or env.get("FLY_ACCESS_TOKEN") or "").strip()
        base_name = "FLY_API_HOSTNAME" if env.get("FLY_API_HOSTNAME") else "FLY_FLAPS_BASE_URL"
        base = env.get(base_name) or DEFAULT_BASE_URL
        logs = env.get("FLY_API_BASE_URL") or DEFAULT_LOGS_BASE_URL
        return cls(
            token=Secret(token) if token else None,
            base_url=normalize_base_url(base, name=base_name, strip_v1=True),
            logs_base_url=normalize_base_url(logs, name="FLY_API_BASE_URL"),
            app=(env.get("FLY_APP") or "").strip() or None,
        )

    def with_overrides(
        self,
        *,
        app: str | None = None,
        token: str | Secret | None = None,
        base_url: str | None = None,
        logs_base_url: str | None = None,
    ) -> ClientConfig:
        """A copy with every argument that is not None put in place of the current value."""
        if isinstance(token, str):
            token = Secret(token.strip())
        return replace(
            self,
            app=self.app if app is None else app,
            token=self.token if token is None else token,
            base_url=self.base_url if base_url is None else base_url,
            logs_base_url=self.logs_base_url if logs_base_url is None else logs_base_url,
        )

    @property
    def authorization(self) -> str | None:
        """The Authorization header value, or None when there is no token."""
        if not self.token:
            return None
        return authorization_header(self.token.reveal())
