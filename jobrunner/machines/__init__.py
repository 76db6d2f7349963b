"""Typed client for the Fly Machines API (and the logs API), async first with a sync facade.

    from jobrunner.machines import AsyncMachinesClient, MachinesClient

See docs/client.md for configuration, the error tree, retries, rate limits and the
no-duplicate-create rule.
"""

from __future__ import annotations

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
