"""Wake idle workers as soon as work is enqueued, so they need not poll the ledger often.

Why: a worker that finds the queue empty would otherwise sleep for its poll interval, so new work
waits up to that long, or the database is polled many times a second by every worker. Instead a
worker holds a :class:`Wakeup` and sleeps in ``await wakeup.wait(poll_interval)``; whoever
enqueues calls :func:`notify`, and the worker wakes within a fraction of a millisecond. Polling
stays as the safety net: every mechanism here is best effort, and a lost wake only costs one poll
interval.

How:

- Same host (every ledger): each Wakeup binds a Unix datagram socket named
  ``<pid>-<random>.sock`` in ``<home>/wakeup/<16 hex chars of the ledger's hash>/`` (folders mode
  0700, so only this user can wake or see its workers). ``notify`` sends one byte to every socket
  there without blocking; a socket file whose owner died without cleaning up answers
  ECONNREFUSED and is removed. The worker's side is a non-blocking socket watched by the event
  loop (``loop.add_reader``), no thread.
- PostgreSQL ledgers, for workers on other hosts: the Wakeup also keeps a dedicated psycopg 3
  connection doing ``LISTEN jobrunner_wakeup``. ``notify(connection=...)`` queues
  ``pg_notify('jobrunner_wakeup', '')`` in the caller's transaction; PostgreSQL delivers it when
  that transaction commits, to every listener on every host, this one included. If that
  connection cannot be opened or drops, the Wakeup logs one warning and carries on with the
  socket alone.

Call :func:`notify` after the commit that made the work visible, except when passing the
PostgreSQL connection of the enqueuing transaction: a worker woken before the commit would look,
find nothing and go back to sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import socket
import stat
import sys
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import sqlalchemy.exc as sa_exc
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    import psycopg
    import sqlalchemy

__all__ = ["CHANNEL", "Wakeup", "notify"]

logger = logging.getLogger(__name__)

CHANNEL = "jobrunner_wakeup"
SOCKET_SUFFIX = ".sock"

# pg_notify inside the caller's transaction, wrapped in a savepoint and sent as one round trip:
# if the statement failed without the savepoint, the caller's transaction would be aborted, and
# committing an aborted PostgreSQL transaction silently rolls it back, losing the enqueued work.
_NOTIFY_SQL = f"SELECT pg_notify('{CHANNEL}', '')"
_SAVEPOINT = "jobrunner_wakeup"
_GUARDED_NOTIFY_SQL = f"SAVEPOINT {_SAVEPOINT}; {_NOTIFY_SQL}; RELEASE SAVEPOINT {_SAVEPOINT}"
_UNDO_NOTIFY_SQL = f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}; RELEASE SAVEPOINT {_SAVEPOINT}"

# Settings for the LISTEN connection unless the URL sets them: do not hang on an unreachable
# server, and let TCP keepalives notice a silently dead peer (the connection never sends
# anything itself, so without them a vanished server would go unnoticed for hours).
_LISTEN_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "application_name": "jobrunner-wakeup",
}

_POSTGRES_SCHEME = re.compile(r"^(?:postgresql|postgres)(?:\+[A-Za-z0-9_]+)?://", re.IGNORECASE)

# sun_path holds 108 bytes on Linux and 104 on macOS; longer socket paths are reached through
# /proc/self/fd/<directory fd>/<name> where that exists (Linux), else the socket is not used.
_MAX_SOCKET_PATH = 100
_PROC_FD = "/proc/self/fd"
_HAVE_PROC_FD = sys.platform.startswith("linux") and os.path.isdir(_PROC_FD)
_RECV_SIZE = 64


def is_postgres_url(database_url: str) -> bool:
    """True for ``postgresql://``, ``postgres://`` and ``postgresql+<driver>://`` URLs."""
    return _POSTGRES_SCHEME.match(database_url) is not None


def postgres_conninfo(database_url: str) -> str:
    """The libpq URI for a SQLAlchemy-style PostgreSQL URL (the ``+driver`` part dropped)."""
    return _POSTGRES_SCHEME.sub("postgresql://", database_url, count=1)


def _masked(database_url: str) -> str:
    try:
        return make_url(database_url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return "<unparsable database URL>"


def _ledger_key(database_url: str) -> str:
    """What identifies the ledger, so that differently spelled URLs share one socket folder.

    The PostgreSQL user and password are left out (two processes may log in differently to the
    same ledger); a relative SQLite path is made absolute.
    """
    try:
        url = make_url(postgres_conninfo(database_url))
    except sa_exc.ArgumentError:
        return database_url
    backend = url.get_backend_name()
    if backend == "postgresql":
        socket_host = url.query.get("host", "")
        return f"postgresql://{url.host or socket_host}:{url.port or 5432}/{url.database or ''}"
    if backend == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            database = os.path.abspath(os.path.expanduser(database))
        return f"sqlite:///{database}"
    return url.render_as_string(hide_password=False)


@lru_cache(maxsize=64)
def _socket_dir(database_url: str, home: Path, cwd: str) -> str:
    # Cached because notify() must stay cheap; cwd is part of the key only because a relative
    # SQLite path depends on it.
    digest = hashlib.sha256(_ledger_key(database_url).encode()).hexdigest()[:16]
    return str(Path(home).expanduser() / "wakeup" / digest)


def socket_dir(database_url: str, home: Path) -> Path:
    """The folder holding the sockets of the Wakeups on ``database_url``'s ledger."""
    return Path(_socket_dir(database_url, home, os.getcwd()))


def _too_long(directory: str) -> bool:
    # Room for "/<pid>-<8 hex>.sock" (at most 27 bytes).
    return len(os.fsencode(directory)) + 27 > _MAX_SOCKET_PATH


def _open_dir_fd(directory: str) -> int:
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


# -- the enqueuing side --------------------------------------------------------------------------


def notify(
    *,
    database_url: str,
    home: Path,
    connection: sqlalchemy.Connection | None = None,
) -> None:
    """Best effort: wake every worker that shares this ledger. Never raises.

    Without ``connection`` (or with a non-PostgreSQL one), the workers on this host are woken at
    once through their sockets: call this after committing the work. With a PostgreSQL
    ``connection``, ``pg_notify`` is queued in its transaction and PostgreSQL wakes every worker,
    on every host, when that transaction commits; the socket wake is then skipped, since it would
    come before the commit (in autocommit mode both are sent). Failures are logged at debug level.
    """
    if connection is not None:
        try:
            if connection.dialect.name == "postgresql" and _notify_postgres(connection):
                return
        except Exception:
            logger.debug("wakeup: pg_notify failed; waking this host only", exc_info=True)
    try:
        _notify_sockets(_socket_dir(database_url, home, os.getcwd()))
    except Exception:
        logger.debug("wakeup: notifying local workers failed", exc_info=True)


def _notify_postgres(connection: sqlalchemy.Connection) -> bool:
    """Send pg_notify on ``connection``; True when it waits for the caller's commit."""
    driver_connection = connection.connection.driver_connection
    if getattr(driver_connection, "autocommit", False):
        # No transaction to protect or wait for: delivered now.
        connection.exec_driver_sql(_NOTIFY_SQL)
        return False
    try:
        connection.exec_driver_sql(_GUARDED_NOTIFY_SQL)
    except Exception:
        with contextlib.suppress(Exception):
            connection.exec_driver_sql(_UNDO_NOTIFY_SQL)
        raise
    return True


def _notify_sockets(directory: str) -> None:
    dir_fd: int | None = None
    try:
        if _too_long(directory):
            if not _HAVE_PROC_FD:
                logger.debug("wakeup: socket folder path too long: %s", directory)
                return
            dir_fd = _open_dir_fd(directory)
            names = os.listdir(dir_fd)
            base = f"{_PROC_FD}/{dir_fd}"
        else:
            names = os.listdir(directory)
            base = directory
    except FileNotFoundError:
        # No worker ever waited on this ledger here: the cheap, common case.
        return
    sender: socket.socket | None = None
    try:
        for name in names:
            if not name.endswith(SOCKET_SUFFIX):
                continue
            if sender is None:
                sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sender.setblocking(False)
            _send_wake(sender, f"{base}/{name}")
    finally:
        if sender is not None:
            sender.close()
        if dir_fd is not None:
            os.close(dir_fd)


def _send_wake(sender: socket.socket, address: str) -> None:
    try:
        sender.sendto(b"\x01", address)
    except BlockingIOError:
        pass  # Its queue is full, so it has a wake pending already.
    except FileNotFoundError:
        pass  # It closed between listing and sending.
    except ConnectionRefusedError:
        # Nothing is bound to the file: its process died without aclose(). Remove it so later
        # notifies skip it (only if it is a socket: ECONNREFUSED is also what a plain file gives).
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(address).st_mode):
                os.unlink(address)
    except OSError as exc:
        logger.debug("wakeup: cannot send to %s: %s", address, exc)


# -- the worker's side ---------------------------------------------------------------------------


class Wakeup:
    """What a worker holds: ``await wakeup.wait(poll_interval)`` returns early when notified.

    Create with ``await Wakeup.open(...)``; use in one event loop; close with :meth:`aclose` (or
    ``async with``). Once :meth:`open` returns, any later :func:`notify` is noticed.
    """

    def __init__(self, *, loop: asyncio.AbstractEventLoop, database_url: str) -> None:
        """Internal: use :meth:`open`."""
        self._loop = loop
        self._database_url = database_url
        self._sock: socket.socket | None = None
        self._sock_path: Path | None = None
        self._listener: psycopg.AsyncConnection[Any] | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[bool]] = []
        self._pending = False  # a wake arrived while nobody was waiting
        self._warned: set[str] = set()  # kinds of problem already logged as a warning
        self._closed = False

    @classmethod
    async def open(cls, *, database_url: str, home: Path) -> Self:
        """Start listening: the local socket, plus LISTEN on a PostgreSQL ledger.

        Problems are logged as warnings and leave a Wakeup whose :meth:`wait` simply times out
        (the worker then polls), so a worker never fails to start because of this optimisation.
        """
        wakeup = cls(loop=asyncio.get_running_loop(), database_url=database_url)
        try:
            wakeup._bind(socket_dir(database_url, home))
            if is_postgres_url(database_url):
                await wakeup._listen_postgres()
        except BaseException:
            await wakeup.aclose()
            raise
        return wakeup

    @property
    def listening_on_postgres(self) -> bool:
        """Whether the PostgreSQL LISTEN connection is up (False for SQLite ledgers)."""
        return self._listen_task is not None and not self._listen_task.done()

    @property
    def socket_path(self) -> Path | None:
        """This Wakeup's socket file (None when it could not be bound)."""
        return self._sock_path

    async def wait(self, timeout: float) -> bool:
        """Wait until notified (True) or ``timeout`` seconds pass (False).

        Wakes that arrived since the last call count: several collapse into one True.
        """
        if self._closed:
            raise RuntimeError("Wakeup.wait() called after aclose()")
        # Datagrams may have arrived without the loop having run the reader yet.
        self._drain()
        if self._pending:
            self._pending = False
            return True
        if timeout <= 0:
            return False
        # A plain future resolved by the readers or by a timer: no task is cancelled on timeout,
        # so this behaves the same under asyncio and anyio cancel scopes.
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._waiters.append(waiter)
        timer = self._loop.call_later(timeout, _resolve, waiter, False)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._pending = True  # cancelled just after being woken: keep the wake
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    async def aclose(self) -> None:
        """Stop listening and remove the socket file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for waiter in self._waiters:
            _resolve(waiter, False)
        self._waiters.clear()
        if self._sock is not None:
            # Unlink before closing so no notify sees a dead socket in between.
            if self._sock_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._sock_path.unlink()
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._listen_task is not None:
            self._listen_task.cancel()
            # asyncio.wait, not await task: a cancellation of aclose() itself still propagates.
            await asyncio.wait([self._listen_task])
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- internals --

    def _wake(self) -> None:
        if self._waiters:
            for waiter in self._waiters:
                _resolve(waiter, True)
            self._waiters.clear()
        else:
            self._pending = True

    def _drain(self) -> None:
        """Read every queued datagram; one or many, they make one wake."""
        sock = self._sock
        if sock is None:
            return
        received = False
        while True:
            try:
                sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                logger.debug("wakeup: socket receive failed: %s", exc)
                break
            received = True
        if received:
            self._wake()

    def _bind(self, directory: Path) -> None:
        try:
            directory.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.parent.mkdir(mode=0o700, exist_ok=True)
            directory.mkdir(mode=0o700, exist_ok=True)
            path = directory / f"{os.getpid()}-{secrets.token_hex(4)}{SOCKET_SUFFIX}"
            # Python sockets are close-on-exec (PEP 446): child processes do not inherit it.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError as exc:
            self._warn("socket", f"cannot create the wakeup socket in {directory}: {exc}")
            return
        try:
            sock.setblocking(False)
            if not _too_long(str(directory)):
                sock.bind(str(path))
            elif _HAVE_PROC_FD:
                dir_fd = _open_dir_fd(str(directory))
                try:
                    sock.bind(f"{_PROC_FD}/{dir_fd}/{path.name}")
                finally:
                    os.close(dir_fd)
            else:
                raise OSError(errno.ENAMETOOLONG, "path too long for a Unix socket")
            self._loop.add_reader(sock.fileno(), self._drain)
        except OSError as exc:
            sock.close()
            self._warn("socket", f"cannot bind the wakeup socket {path}: {exc}")
            return
        self._sock = sock
        self._sock_path = path

    async def _listen_postgres(self) -> None:
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict, make_conninfo

            params = {**_LISTEN_DEFAULTS, **conninfo_to_dict(postgres_conninfo(self._database_url))}
            listener = await psycopg.AsyncConnection.connect(
                make_conninfo("", **params), autocommit=True
            )
        except Exception as exc:
            self._warn_postgres(exc)
            return
        try:
            await listener.execute(f"LISTEN {CHANNEL}")
        except Exception as exc:
            with contextlib.suppress(Exception):
                await listener.close()
            self._warn_postgres(exc)
            return
        self._listener = listener
        self._listen_task = self._loop.create_task(
            self._receive_notifications(listener), name="jobrunner-wakeup-listen"
        )

    async def _receive_notifications(self, listener: psycopg.AsyncConnection[Any]) -> None:
        try:
            # notifies() waits on the connection's socket through the event loop; cancelling
            # this task (aclose) interrupts it cleanly since no query is running.
            async with contextlib.aclosing(listener.notifies()) as notifications:
                async for _ in notifications:
                    self._wake()
            raise ConnectionError("the notification stream ended")
        except Exception as exc:
            if not self._closed:
                self._warn_postgres(exc)
            with contextlib.suppress(Exception):
                await listener.close()

    def _warn_postgres(self, exc: Exception) -> None:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._warn(
            "postgres",
            f"no PostgreSQL LISTEN on {_masked(self._database_url)} ({detail}); workers on "
            "other hosts will be noticed by polling only",
        )

    def _warn(self, kind: str, message: str) -> None:
        # Once per Wakeup and kind: a worker that falls back to polling should not flood its log.
        if kind in self._warned:
            logger.debug("wakeup: %s", message)
            return
        self._warned.add(kind)
        logger.warning("wakeup: %s", message)


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)
