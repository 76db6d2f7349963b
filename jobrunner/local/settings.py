"""How a local backend server is configured: arguments first, then environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from jobrunner.errors import ConfigError
from jobrunner.local.api.faults import FaultConfig

__all__ = [
    "ADMIN_ENV",
    "DEFAULT_APP",
    "DEFAULT_HOST",
    "DEFAULT_LOG_RETENTION",
    "DEFAULT_PORT",
    "DEFAULT_RETENTION",
    "FAULTS_ENV",
    "TOKEN_ENV",
    "ServerSettings",
    "base_url",
    "default_state_dir",
    "faults_from_env",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4280
DEFAULT_APP = "jobrunner-local"
TOKEN_ENV = "JOBRUNNER_LOCAL_TOKEN"
FAULTS_ENV = "JOBRUNNER_LOCAL_FAULTS"
ADMIN_ENV = "JOBRUNNER_LOCAL_ADMIN"
# Fly keeps destroyed machines readable "for a while" (flyctl and cron-manager rely on ~48 h).
DEFAULT_RETENTION = timedelta(hours=48)
DEFAULT_LOG_RETENTION = timedelta(days=7)  # Fly's logs retention is about 7 days


def base_url(host: str, port: int) -> str:
    """``http://host:port``, with IPv6 addresses in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def default_state_dir() -> Path:
    """``$JOBRUNNER_HOME/local``, with ``JOBRUNNER_HOME`` defaulting to ``~/.jobrunner``."""
    home = os.environ.get("JOBRUNNER_HOME") or "~/.jobrunner"
    return Path(home).expanduser() / "local"


def faults_from_env() -> FaultConfig | None:
    raw = os.environ.get(FAULTS_ENV)
    if not raw:
        return None
    try:
        return FaultConfig.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{FAULTS_ENV} is invalid: {exc}") from None


@dataclass
class ServerSettings:
    """Everything a server needs to run. The token never appears in the repr."""

    state_dir: Path
    token: str = field(repr=False)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    default_app: str = DEFAULT_APP
    retention: timedelta = DEFAULT_RETENTION
    log_retention: timedelta = DEFAULT_LOG_RETENTION
    admin: bool = False
    fake_clock: bool = False
    faults: FaultConfig | None = None
    access_log: bool = False
