"""Running a server in the foreground: bind, lock the state dir, serve until SIGINT/SIGTERM.

The server holds ``server.lock`` (flock) while it runs, so two servers never share a state dir,
and writes ``server.json`` once it listens (see ``statefiles``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import importlib.util
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Literal

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobrunner.errors import ConfigError
from jobrunner.local.api.app import build_app
from jobrunner.local.backend import LocalBackend
from jobrunner.local.settings import ServerSettings, base_url
from jobrunner.local.statefiles import INFO_FILE, LOCK_FILE, make_state_dir, read_server_info

__all__ = ["bind_socket", "serve"]

logger = logging.getLogger("jobrunner.local")

_GRACEFUL_SHUTDOWN = 5


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# httptools and uvloop (C) cut the server's CPU per machine (create, wait, get, logs) by 15-20 %
# against h11 and the stdlib loop (bench/local_backend_bench.py, docs/performance.md); h11 and
# asyncio remain the fallback where the wheels are missing.
_HTTP: Literal["httptools", "h11"] = "httptools" if _available("httptools") else "h11"
_LOOP: Literal["uvloop", "asyncio"] = "uvloop" if _available("uvloop") else "asyncio"


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so a port in use gets a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on connections of such sockets, and
    # without it every answer waits ~40 ms for a delayed ACK (headers and body are two writes).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use by another program: stop it, or pass "
                "--port to use another port"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def _state_dir_lock(state_dir: Path) -> Iterator[None]:
    make_state_dir(state_dir)
    handle: IO[str] = open(state_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = read_server_info(state_dir) or {}
            raise ConfigError(
                f"another local backend server (pid {info.get('pid', '?')}, "
                f"{info.get('base_url', 'unknown address')}) already uses state dir {state_dir}: "
                "stop it with `jobrunner local stop`, or pass another --state-dir"
            ) from None
        yield
    finally:
        handle.close()


class _Server(uvicorn.Server):
    """uvicorn, plus: release long-polls on SIGINT/SIGTERM and write server.json once listening."""

    def __init__(self, config: uvicorn.Config, backend: LocalBackend) -> None:
        super().__init__(config)
        self._backend = backend
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        # SIGUSR1 (`jobrunner local stop`): stop serving but leave the machines running.
        with contextlib.suppress(ValueError):  # not the main thread: no signals to handle
            signal.signal(signal.SIGUSR1, self._detach)
        await super().startup(sockets)
        if self.started:
            _write_info(self._backend.settings)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        # Here, not after run(): uvicorn re-raises SIGINT/SIGTERM once serving is over, which
        # ends the process before code after run() could execute.
        _remove_info(self._backend.settings.state_dir)

    def _detach(self, sig: int, frame: FrameType | None) -> None:
        self._backend.stop_machines = False
        self.handle_exit(signal.SIGTERM, frame)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler: hand the work to the loop instead of touching it from here.
        if self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self._backend.begin_shutdown)
        super().handle_exit(sig, frame)


def _durable_answers(app: ASGIApp, backend: LocalBackend) -> ASGIApp:
    """Commit pending state writes before an answer starts: a client that got an answer must
    find its effect after a crash (the registry batches writes per loop iteration)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_durably(message: Message) -> None:
            if message["type"] == "http.response.start":
                backend.registry.flush_writes()
            await send(message)

        await app(scope, receive, send_durably)

    return wrapped


def _write_info(settings: ServerSettings) -> None:
    info = {
        "pid": os.getpid(),
        "host": settings.host,
        "port": settings.port,
        "base_url": base_url(settings.host, settings.port),
        "state_dir": str(settings.state_dir),
        "started_at": datetime.now(UTC).isoformat(),
    }
    path = settings.state_dir / INFO_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(info, indent=2) + "\n")
    temporary.replace(path)


def _remove_info(state_dir: Path) -> None:
    info = read_server_info(state_dir)
    if info is not None and info.get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            (state_dir / INFO_FILE).unlink()


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve(
    settings: ServerSettings, announce: Callable[[ServerSettings], None] | None = None
) -> None:
    """Serve in the foreground until SIGINT/SIGTERM, then stop the machines and exit.

    ``announce`` is called once the port is bound (``settings.port`` is then the real port).
    Raises ``ConfigError`` when the state dir is in use or the port cannot be bound.
    """
    with _state_dir_lock(settings.state_dir):
        sock = bind_socket(settings.host, settings.port)
        if settings.port == 0:
            settings.port = sock.getsockname()[1]
        backend = LocalBackend(settings)
        config = uvicorn.Config(
            _durable_answers(build_app(backend), backend),
            lifespan="on",
            log_config=None,
            access_log=settings.access_log,
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN,
            loop=_LOOP,
            http=_HTTP,
            ws="none",
        )
        server = _Server(config, backend)
        if announce is not None:
            announce(settings)
        logger.info(
            "jobrunner local backend on %s (state dir %s)",
            base_url(settings.host, settings.port),
            settings.state_dir,
        )
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
            _remove_info(settings.state_dir)
        if not server.started:
            raise ConfigError(f"the local backend failed to start; see the log above ({settings})")
