"""Typed client for the Fly Machines API (and the logs API), async first with a sync facade.

    from jobrunner.machines import AsyncMachinesClient, MachinesClient

See docs/client.md for configuration, the error tree, retries, rate limits and the
no-duplicate-create rule.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The names below are imported on first use: the models (which job validation needs) must not
# pull in the HTTP client (httpx, aiohttp) for commands that never talk to an API.
_LAZY = {
    "App": "jobrunner.machines.models",
    "AsyncMachinesClient": "jobrunner.machines.client",
    "BadRequest": "jobrunner.machines.errors",
    "ClientConfig": "jobrunner.machines.config",
    "Clock": "jobrunner.machines.clock",
    "Conflict": "jobrunner.machines.errors",
    "ExecResult": "jobrunner.machines.introspection",
    "InsufficientCapacity": "jobrunner.machines.errors",
    "Lease": "jobrunner.machines.models",
    "LeaseError": "jobrunner.machines.errors",
    "Limit": "jobrunner.machines.ratelimit",
    "LogEntry": "jobrunner.machines.models",
    "LogsPage": "jobrunner.machines.models",
    "Machine": "jobrunner.machines.models",
    "MachineConfig": "jobrunner.machines.models",
    "MachineDestroyed": "jobrunner.machines.errors",
    "MachineEvent": "jobrunner.machines.models",
    "MachineVersion": "jobrunner.machines.introspection",
    "MachinesAPIError": "jobrunner.machines.errors",
    "MachinesClient": "jobrunner.machines.sync",
    "MachinesConnectionError": "jobrunner.machines.errors",
    "MachinesError": "jobrunner.machines.errors",
    "NotFound": "jobrunner.machines.errors",
    "ProcessStat": "jobrunner.machines.introspection",
    "RateLimited": "jobrunner.machines.errors",
    "RateLimiter": "jobrunner.machines.ratelimit",
    "RequestRetryPolicy": "jobrunner.machines.retry",
    "Secret": "jobrunner.machines.config",
    "ServerError": "jobrunner.machines.errors",
    "Unauthorized": "jobrunner.machines.errors",
    "ValidationFailed": "jobrunner.machines.errors",
    "WaitState": "jobrunner.machines.models",
    "WaitTimeout": "jobrunner.machines.errors",
    "error_from_response": "jobrunner.machines.errors",
}

__all__ = [
    "App",
    "AsyncMachinesClient",
    "BadRequest",
    "ClientConfig",
    "Clock",
    "Conflict",
    "ExecResult",
    "InsufficientCapacity",
    "Lease",
    "LeaseError",
    "Limit",
    "LogEntry",
    "LogsPage",
    "Machine",
    "MachineConfig",
    "MachineDestroyed",
    "MachineEvent",
    "MachineVersion",
    "MachinesAPIError",
    "MachinesClient",
    "MachinesConnectionError",
    "MachinesError",
    "NotFound",
    "ProcessStat",
    "RateLimited",
    "RateLimiter",
    "RequestRetryPolicy",
    "Secret",
    "ServerError",
    "Unauthorized",
    "ValidationFailed",
    "WaitState",
    "WaitTimeout",
    "error_from_response",
]

if TYPE_CHECKING:
    from jobrunner.machines.client import AsyncMachinesClient
    from jobrunner.machines.clock import Clock
    from jobrunner.machines.config import ClientConfig, Secret
    from jobrunner.machines.errors import (
        BadRequest,
        Conflict,
        InsufficientCapacity,
        LeaseError,
        MachineDestroyed,
        MachinesAPIError,
        MachinesConnectionError,
        MachinesError,
        NotFound,
        RateLimited,
        ServerError,
        Unauthorized,
        ValidationFailed,
        WaitTimeout,
        error_from_response,
    )
    from jobrunner.machines.introspection import ExecResult, MachineVersion, ProcessStat
    from jobrunner.machines.models import (
        App,
        Lease,
        LogEntry,
        LogsPage,
        Machine,
        MachineConfig,
        MachineEvent,
        WaitState,
    )
    from jobrunner.machines.ratelimit import Limit, RateLimiter
    from jobrunner.machines.retry import RequestRetryPolicy
    from jobrunner.machines.sync import MachinesClient


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jobrunner.machines' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
