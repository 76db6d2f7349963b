"""Pure helpers for building requests and reading responses: paths, query values, bodies, JSON.

Nothing here does I/O, so the client's methods stay a few lines each and these rules are tested
once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ValidationError

from jobrunner.errors import ConfigError
from jobrunner.machines.errors import LeaseError, MachinesError
from jobrunner.machines.models import App, Lease, MachineConfig

__all__ = [
    "Params",
    "app_path",
    "apps_path",
    "config_from",
    "go_duration",
    "machines_path",
    "parse_apps",
    "parse_json",
    "parse_lease",
    "parse_model",
    "parse_models",
    "query_bool",
]

M = TypeVar("M", bound=BaseModel)

# Query parameters as pairs, so a key such as "state" can repeat.
Params = list[tuple[str, str]]


def _segment(value: str) -> str:
    """One path segment, escaped so an id or metadata key can never change the path's shape."""
    if not value:
        raise ValueError("an empty app name, machine id or key cannot be part of a URL path")
    return quote(value, safe="")


def apps_path() -> str:
    return "/v1/apps"


def app_path(app: str) -> str:
    return f"/v1/apps/{_segment(app)}"


def machines_path(app: str, *parts: str) -> str:
    """``/v1/apps/{app}/machines[/{part}...]`` with every part escaped."""
    tail = "".join(f"/{_segment(part)}" for part in parts)
    return f"{app_path(app)}/machines{tail}"


def query_bool(value: bool) -> str:
    """Booleans as the API's Go handlers parse them."""
    return "true" if value else "false"


def go_duration(value: float | str) -> str:
    """A Go duration string: 10 -> "10s", 1.5 -> "1500ms"; a string is passed through.

    fly-go sends stop/restart timeouts this way, and reads a bare number as nanoseconds, so a
    number must never be sent as is (fly-machines-api.md section 7).
    """
    if isinstance(value, str):
        return value
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a timeout must be a finite number of seconds >= 0, got {value!r}")
    if float(value).is_integer():
        return f"{int(value)}s"
    return f"{round(value * 1000)}ms"


def parse_json(content: bytes, *, what: str, redact: tuple[str, ...] = ()) -> Any:
    """The decoded JSON body, or None for an empty body (204, or a 200 with nothing).

    Every string in ``redact`` is blanked out of the body preview in the error, in case a
    proxy page echoes the token back.
    """
    if not content.strip():
        return None
    try:
        return json.loads(content)
    except ValueError as exc:
        text = content.decode("utf-8", "replace")
        # Blank before cutting, so a token that straddles the cut cannot leave a piece behind.
        for secret in redact:
            if secret:
                text = text.replace(secret, "***")
        preview = repr(text[:80])
        raise MachinesError(
            f"{what}: the API answered with a body that is not JSON ({preview}); "
            "check that FLY_API_HOSTNAME points at a Machines API"
        ) from exc


def _problems(exc: ValidationError) -> str:
    """Field paths and messages only: input values could hold a job's env or secrets."""
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or '(root)'}: {err['msg']}"
        for err in exc.errors(include_url=False, include_input=False)
    )


def config_from(config: MachineConfig | Mapping[str, Any], *, what: str) -> MachineConfig:
    """A ``MachineConfig`` from a model or a mapping; a bad mapping is a ``ConfigError``.

    The error names the fields, never their values, and does not chain pydantic's error
    (whose text shows the values), since env values may be secrets.
    """
    if isinstance(config, MachineConfig):
        return config
    try:
        return MachineConfig.model_validate(dict(config))
    except ValidationError as exc:
        problems = _problems(exc)
    raise ConfigError(f"{what}: the machine config is not valid ({problems}); fix these fields")


def parse_model(data: Any, model: type[M], *, what: str) -> M:
    """Validate one object, with an error naming the call instead of a bare pydantic error."""
    if not isinstance(data, Mapping):
        raise MachinesError(f"{what}: expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = _problems(exc)
    # Raised outside the except block so pydantic's error, which quotes the values (a machine's
    # env among them), is not chained into tracebacks and logs.
    raise MachinesError(f"{what}: the answer does not look like a {model.__name__} ({problems})")


def parse_models(data: Any, model: type[M], *, what: str) -> list[M]:
    """Validate a JSON list of objects (None counts as empty)."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise MachinesError(f"{what}: expected a JSON list, got {type(data).__name__}")
    return [parse_model(item, model, what=what) for item in data]


def parse_apps(data: Any) -> list[App]:
    """Apps from either a bare list or ``{"apps": [...], "total_apps": n}``."""
    if isinstance(data, Mapping):
        data = data.get("apps")
    return parse_models(data, App, what="list apps")


def parse_lease(data: Any, *, what: str) -> Lease:
    """The lease envelope; a status other than "success" is an error even on a 2xx."""
    lease = parse_model(data, Lease, what=what)
    if not lease.ok:
        detail = lease.message or "no message"
        code = f", code {lease.code}" if lease.code else ""
        raise LeaseError(
            f"{what}: the API answered status {lease.status!r} ({detail}{code}); "
            "the lease is not held, so do not change the machine"
        )
    return lease
