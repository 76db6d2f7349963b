"""Finding, starting and stopping a background local backend server, and its token.

The CLI and the library call ``ensure_running()`` whenever the local backend is selected: it
reuses a healthy server found through ``server.json`` in the state dir, or starts
``python -m jobrunner.local serve`` detached (its own session, no inherited stdio, output to
``server.log``) and waits until ``GET /healthz`` answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from jobrunner.errors import ConfigError
from jobrunner.local.process.supervisor import pid_alive
from jobrunner.local.settings import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    TOKEN_ENV,
    base_url,
    default_state_dir,
)
from jobrunner.local.statefiles import (
    INFO_FILE,
    LOG_FILE,
    SERVICE_NAME,
    TOKEN_FILE,
    make_state_dir,
    read_server_info,
)

__all__ = [
    "LocalEndpoint",
    "ServerStatus",
    "ensure_running",
    "ensure_token",
    "read_token",
    "server_status",
    "stop_server",
    "wait_shim_gone",
]

_POLL = 0.05


@dataclass(frozen=True)
class LocalEndpoint:
    """Where a running local backend answers, and the token it wants."""

    base_url: str
    token: str = field(repr=False)
    state_dir: Path
    pid: int


@dataclass(frozen=True)
class ServerStatus:
    running: bool
    state_dir: Path
    pid: int | None = None
    base_url: str | None = None
    version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "state_dir": str(self.state_dir),
            "pid": self.pid,
            "base_url": self.base_url,
            "version": self.version,
        }


def read_token(state_dir: Path | None = None) -> str:
    """The API token: ``JOBRUNNER_LOCAL_TOKEN`` if set, else the one stored in the state dir."""
    from_env = os.environ.get(TOKEN_ENV)
    if from_env:
        return from_env
    path = (state_dir or default_state_dir()) / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(
            f"no local backend token at {path}: start the server once (`jobrunner local start`) "
            f"or set {TOKEN_ENV}"
        ) from None
    if not token:
        raise ConfigError(f"{path} is empty: delete it and start the local backend again")
    return token


def ensure_token(state_dir: Path | None = None) -> str:
    """The token, generated and stored (mode 0600) on first use when none is set or stored."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    state_dir = state_dir or default_state_dir()
    make_state_dir(state_dir)
    path = state_dir / TOKEN_FILE
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token(state_dir)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def ensure_running(
    state_dir: Path | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    timeout: float = 15.0,
) -> LocalEndpoint:
    """Return a healthy server for ``state_dir``, starting one in the background if needed.

    Raises ``ConfigError`` when the port is taken by something else or the server cannot start
    within ``timeout`` seconds (the message quotes the end of server.log).
    """
    state_dir = (state_dir or default_state_dir()).expanduser().absolute()
    token = ensure_token(state_dir)
    found = _healthy_server(state_dir)
    if found is not None:
        return LocalEndpoint(found[0], token, state_dir, found[1])
    url = base_url(host, port)
    _refuse_taken_port(host, port, url, state_dir)
    process = _spawn(state_dir, host, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _healthy_server(state_dir)
        if found is not None:
            return LocalEndpoint(found[0], token, state_dir, found[1])
        if process.poll() is not None:
            found = _healthy_server(state_dir)  # lost a race to another starter: use its server
            if found is not None:
                return LocalEndpoint(found[0], token, state_dir, found[1])
            raise ConfigError(
                f"the local backend server exited with code {process.returncode} while starting. "
                f"End of {state_dir / LOG_FILE}:\n{_log_tail(state_dir)}"
            )
        time.sleep(_POLL)
    raise ConfigError(
        f"the local backend server did not answer on {url} within {timeout:.0f} s; "
        f"see {state_dir / LOG_FILE}:\n{_log_tail(state_dir)}"
    )


def server_status(state_dir: Path | None = None) -> ServerStatus:
    """Whether a healthy server uses ``state_dir``, and where."""
    state_dir = (state_dir or default_state_dir()).expanduser().absolute()
    info = read_server_info(state_dir)
    if info is None:
        return ServerStatus(running=False, state_dir=state_dir)
    health = _health(str(info.get("base_url", "")))
    if health is None or health.get("state_dir") != str(state_dir):
        return ServerStatus(running=False, state_dir=state_dir, pid=info.get("pid"))
    return ServerStatus(
        running=True,
        state_dir=state_dir,
        pid=health.get("pid"),
        base_url=info.get("base_url"),
        version=health.get("version"),
    )


def stop_server(
    state_dir: Path | None = None, timeout: float = 30.0, *, stop_machines: bool = False
) -> bool:
    """Stop the server using ``state_dir`` (then SIGKILL after ``timeout`` s).

    Returns False when no server was running. By default only the API server stops: the
    machines keep running under the shim, and the next server adopts them (SIGUSR1). With
    ``stop_machines`` the server stops every machine and records its exit first (SIGTERM), and
    this waits until the shim has exited as well.
    """
    state_dir = (state_dir or default_state_dir()).expanduser().absolute()
    info = read_server_info(state_dir)
    pid = info.get("pid") if info else None
    if not isinstance(pid, int) or not _is_our_server(pid, info or {}, state_dir):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / INFO_FILE).unlink()  # stale: left by a server that was killed
        return False
    os.kill(pid, signal.SIGTERM if stop_machines else signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(_POLL)
    if stop_machines:
        wait_shim_gone(state_dir, timeout=max(5.0, deadline - time.monotonic()))
    return True


def wait_shim_gone(state_dir: Path, timeout: float = 10.0) -> bool:
    """Wait until no shim serves ``state_dir`` (it holds ``shim.lock`` while it runs)."""
    from jobrunner.local.process.shim import (
        SHIM_LOCK_FILE,  # not at import: `-m ...shim` imports this
    )

    try:
        fd = os.open(state_dir / SHIM_LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(_POLL)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return True
    finally:
        os.close(fd)


def _healthy_server(state_dir: Path) -> tuple[str, int] | None:
    info = read_server_info(state_dir)
    if info is None:
        return None
    url = str(info.get("base_url", ""))
    health = _health(url)
    if health is None or health.get("state_dir") != str(state_dir):
        return None
    return url, int(health["pid"])


def _health(url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The /healthz answer if a jobrunner local backend answers at ``url``."""
    if not url:
        return None
    try:
        response = httpx.get(f"{url}/healthz", timeout=timeout, trust_env=False)
        data = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    if response.status_code != 200 or not isinstance(data, dict):
        return None
    return data if data.get("service") == SERVICE_NAME else None


def _refuse_taken_port(host: str, port: int, url: str, state_dir: Path) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.settimeout(1.0)
        if probe.connect_ex((host, port)) != 0:
            return  # nothing listens there: free for the server
    health = _health(url, timeout=1.0)
    if health is not None:
        raise ConfigError(
            f"port {port} on {host} is used by another jobrunner local backend (state dir "
            f"{health.get('state_dir')}, pid {health.get('pid')}): use that state dir, stop that "
            "server, or choose another port"
        )
    raise ConfigError(
        f"port {port} on {host} is in use by another program (not a jobrunner local backend): "
        "stop it or choose another port for the local backend"
    )


def _spawn(state_dir: Path, host: str, port: int) -> subprocess.Popen[bytes]:
    make_state_dir(state_dir)
    command = [
        sys.executable, "-m", "jobrunner.local", "serve",
        "--host", host, "--port", str(port), "--state-dir", str(state_dir),
    ]  # fmt: skip
    with open(state_dir / LOG_FILE, "ab") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            cwd=state_dir,  # not the caller's directory, which the server would keep busy
        )


def _is_our_server(pid: int, info: dict[str, Any], state_dir: Path) -> bool:
    if not pid_alive(pid):
        return False
    health = _health(str(info.get("base_url", "")))
    if health is not None:
        return health.get("pid") == pid and health.get("state_dir") == str(state_dir)
    try:  # not answering (hung?): check the process really is a local backend before killing it
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"jobrunner.local" in cmdline and str(state_dir).encode() in cmdline


def _log_tail(state_dir: Path, lines: int = 15) -> str:
    try:
        text = (state_dir / LOG_FILE).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
