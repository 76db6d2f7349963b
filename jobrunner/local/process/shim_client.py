"""The server's side of the machine shim (shim.py): start it, talk to it, re-adopt after a crash.

``ShimClient.launch`` has the shape of ``supervisor.launch`` and returns a ``RemoteHandle`` with the
methods of ``ProcessHandle``, so the lifecycle code does not care which process is the parent.

Records from the shim carry a sequence number. The server acknowledges a number once everything
up to it is stored: output lines flushed to the database, exits recorded as events (the
lifecycle calls ``release()`` on a handle after recording its exit). A server that dies before
acknowledging gets the records again from the next hello, so nothing is lost; a line stored but
not yet acknowledged when the server died is stored twice (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal as signals
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobrunner.local.process.orphans import kill_orphan_group, pid_alive
from jobrunner.local.process.output import utc_now
from jobrunner.local.process.shim import SHIM_LOG_FILE, SOCKET_FILE, encode_spec
from jobrunner.local.process.supervisor import (
    MemoryEnforcement,
    OutputCallback,
    ProcessExit,
    ProcessSpec,
)

__all__ = ["LOST_ERROR", "LOST_EXIT_CODE", "LiveRun", "RemoteHandle", "ShimClient", "ShimError"]

logger = logging.getLogger("jobrunner.local")

#: The exit code recorded for a process whose exit nobody knows (the shim died with it). -1 is
#: what Fly reports for a VM that died without an exit status.
LOST_EXIT_CODE = -1
LOST_ERROR = "local backend restarted while the machine was running"
SHIM_DIED_ERROR = "the local machine supervisor (shim) ended while the machine was running"
_CONNECT_TIMEOUT = 15.0
_ACK_INTERVAL = 0.2
_LINE_LIMIT = 1 << 24
# Environment variables of the server the shim (and so, by mistake, nothing else) must not see.
_PRIVATE_ENV_PREFIXES = ("JOBRUNNER_LOCAL_SECRET_", "JOBRUNNER_LOCAL_TOKEN")


class ShimError(Exception):
    """The shim could not be started or reached."""


@dataclass(frozen=True)
class LiveRun:
    """A process the shim still runs, as it reports after a hello."""

    run: str
    key: str
    pid: int
    started_at: datetime
    suspended: bool


def _when(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class RemoteHandle:
    """A machine process supervised by the shim; same methods as ``supervisor.ProcessHandle``."""

    def __init__(
        self,
        client: ShimClient,
        key: str,
        on_output: OutputCallback,
        *,
        pid: int = 0,
        started_at: datetime | None = None,
    ) -> None:
        self._client = client
        self.key = key
        self.name = key
        self.run: str | None = None
        self.pid = pid
        self.started_at = started_at or utc_now()
        self._on_output = on_output
        self._exit: asyncio.Future[ProcessExit] = asyncio.get_running_loop().create_future()
        self._exit_seq: int | None = None
        self._requested_stop = False
        self._launched: asyncio.Future[None] | None = None  # set while launch() waits

    def __repr__(self) -> str:
        return f"<RemoteHandle run={self.run} pid={self.pid} key={self.key!r}>"

    @property
    def exited(self) -> bool:
        return self._exit.done()

    async def wait(self) -> ProcessExit:
        return await asyncio.shield(self._exit)

    async def stop(self, signal: int = signals.SIGINT, timeout: float = 5.0) -> ProcessExit:
        if not self.exited:
            self._requested_stop = True
            self._client._control(self, "stop", signal=signal, timeout=timeout)
        return await self.wait()

    def send_signal(self, signal: int) -> None:
        self._client._control(self, "signal", signal=signal)

    def suspend(self) -> None:
        self._client._control(self, "suspend")

    def resume(self) -> None:
        self._client._control(self, "resume")

    def kill(self) -> None:
        if not self.exited:
            self._requested_stop = True
        self._client._control(self, "kill")

    def release(self) -> None:
        """The exit is recorded: the shim may forget it at the next acknowledgement."""
        self._client._released(self)

    def _finish(self, exit_: ProcessExit, seq: int | None) -> None:
        if not self._exit.done():
            self._exit_seq = seq
            if seq is not None:
                self._client._unsettled[id(self)] = seq
            self._exit.set_result(exit_)


class ShimClient:
    """One connection to the state dir's shim, started on demand."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._runs: dict[str, RemoteHandle] = {}  # run id -> handle
        self._launching: dict[str, RemoteHandle] = {}  # request id -> handle
        self._requests = 0
        # Request ids of this server only: a replayed record of an earlier server never matches.
        self._nonce = secrets.token_hex(4)
        self._recovering: dict[str, RemoteHandle] = {}  # key -> handle awaiting replay
        self._ended: dict[str, tuple[str, int]] = {}  # key -> (run, pid) ended while away
        self._stored_at_hello = 0
        self._connect_lock = asyncio.Lock()
        self._unsettled: dict[int, int] = {}  # id(handle) -> seq of its exit record
        self._received = 0
        self._acked = 0
        self._read_task: asyncio.Task[None] | None = None
        self._ack_task: asyncio.Task[None] | None = None
        self._live: asyncio.Future[list[LiveRun]] | None = None
        self._replayed: asyncio.Future[None] | None = None
        self._adopting = asyncio.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self.shim_pid: int | None = None
        self.flush: Callable[[], None] = lambda: None  # stores the output lines received so far
        self.stored_seq: Callable[[], int] = lambda: 0  # the last record the database holds
        self._closing = False

    # connecting --------------------------------------------------------------------------

    async def connect(self) -> list[LiveRun]:
        """Connect (starting the shim if none runs) and return the processes it still runs.

        The records the shim has not seen acknowledged are replayed once ``adopted()`` is called,
        i.e. after the caller has attached handles to the live runs (``adopt``) and to the runs
        it expected but the shim no longer runs (``expect``).
        """
        self._closing = False
        reader, writer = await self._open()
        self._reader, self._writer = reader, writer
        loop = asyncio.get_running_loop()
        self._live = loop.create_future()
        self._replayed = loop.create_future()
        self._adopting = asyncio.Event()
        self._read_task = loop.create_task(self._read(reader), name="jobrunner-shim-reader")
        stored = self.stored_seq()
        self._write({"op": "hello", "pid": os.getpid(), "ack": stored})
        self._stored_at_hello = stored
        live = await asyncio.wait_for(asyncio.shield(self._live), _CONNECT_TIMEOUT)
        if self._ack_task is None:
            self._ack_task = loop.create_task(self._ack_loop(), name="jobrunner-shim-ack")
        return live

    def adopted(self) -> None:
        """Let the replay of unacknowledged records proceed (see ``connect``)."""
        self._adopting.set()

    async def replayed(self) -> None:
        """Return once the replay is over; expected runs with no exit then count as lost."""
        assert self._replayed is not None
        await asyncio.wait_for(asyncio.shield(self._replayed), _CONNECT_TIMEOUT * 4)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = self.state_dir / SOCKET_FILE
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CONNECT_TIMEOUT
        starts = 0
        while True:
            try:
                return await asyncio.open_unix_connection(path, limit=_LINE_LIMIT)
            except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
                pass  # not there yet, or exiting: (re)start one below
            if self._process is None or self._process.poll() is not None:
                # None running, or ours lost the lock race to a shim that is exiting: (re)start,
                # but not forever: one that keeps dying has a reason in its log.
                starts += 1
                if starts > 3:
                    raise ShimError(
                        "the local machine supervisor keeps exiting; see "
                        f"{self.state_dir / SHIM_LOG_FILE}"
                    )
                self._process = self._start_shim()
            if loop.time() > deadline:
                raise ShimError(
                    f"the local machine supervisor did not start within {_CONNECT_TIMEOUT:.0f} s;"
                    f" see {self.state_dir / SHIM_LOG_FILE}"
                )
            await asyncio.sleep(0.02)

    def _start_shim(self) -> subprocess.Popen[bytes]:
        environment = {
            k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV_PREFIXES)
        }
        with open(self.state_dir / SHIM_LOG_FILE, "ab") as log:
            os.chmod(self.state_dir / SHIM_LOG_FILE, 0o600)
            return subprocess.Popen(
                [sys.executable, "-m", "jobrunner.local.process.shim", str(self.state_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # no signal meant for the server's group reaches it
                close_fds=True,  # the server's listening socket must not leak to it or the jobs
                cwd="/",
                env=environment,
            )

    async def close(self, *, final: bool) -> None:
        """Store and acknowledge what was received, then disconnect.

        ``final``: every machine was stopped and its exit recorded, so everything received is
        settled (even a run whose recording failed): the shim may forget all of it and exit.
        """
        self._closing = True
        if self._ack_task is not None:
            self._ack_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ack_task
            self._ack_task = None
        if self._writer is not None and not self._writer.is_closing():
            if final:
                self._unsettled.clear()
            self._send_ack()
            self._write({"op": "bye"})
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()
            self._writer.close()
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._read_task
        if self._process is not None:
            self._process.poll()  # reap it if it has exited already; it is detached otherwise

    # launching and adopting ------------------------------------------------------------------

    async def launch(
        self,
        key: str,
        spec: ProcessSpec,
        on_output: OutputCallback,
        memory_enforcement: MemoryEnforcement = "auto",
    ) -> RemoteHandle:
        """Have the shim start ``spec``; returns once the program runs (or could not start)."""
        async with self._connect_lock:  # one reconnection for all the launches that wait
            if self._writer is None or self._writer.is_closing():
                await self.connect()  # the shim died earlier: a new one serves from now on
                self.adopted()
        handle = RemoteHandle(self, key, on_output)
        self._requests += 1
        request = f"{self._nonce}-{self._requests}"
        self._launching[request] = handle
        launched = handle._launched = asyncio.get_running_loop().create_future()
        self._write(
            {
                "op": "launch",
                "req": request,
                "key": key,
                "spec": encode_spec(spec),
                "memory": memory_enforcement,
            }
        )
        try:
            await launched
        finally:
            self._launching.pop(request, None)
        return handle

    def adopt(self, live: LiveRun, on_output: OutputCallback) -> RemoteHandle:
        """A handle for a process the shim still runs (found by ``connect``)."""
        handle = RemoteHandle(self, live.key, on_output, pid=live.pid, started_at=live.started_at)
        handle.run = live.run
        self._runs[live.run] = handle
        return handle

    def expect(
        self, key: str, pid: int | None, started_at: datetime | None, on_output: OutputCallback
    ) -> RemoteHandle:
        """A handle for a process that ran when the last server stopped, but no longer runs:
        its exit comes in the replay, or it is lost (the shim died too)."""
        handle = RemoteHandle(self, key, on_output, pid=pid or 0, started_at=started_at)
        ended = self._ended.get(key)
        if ended is not None and (not pid or pid == ended[1]):
            handle.run, handle.pid = ended
            self._runs[handle.run] = handle
        # Also by key: its "launched" record may come in the replay (and then the run id).
        self._recovering[key] = handle
        return handle

    # messages ------------------------------------------------------------------------------

    def _write(self, message: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def _control(self, handle: RemoteHandle, op: str, **fields: Any) -> None:
        if handle.run is not None and not handle.exited:
            self._write({"op": op, "run": handle.run, **fields})

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                op = message["op"]
                if op == "live":
                    self._on_live(message)
                    await self._adopting.wait()  # handles first, then the replay
                elif op == "replayed":
                    self._on_replayed()
                else:
                    self._dispatch(message)
        except (ConnectionError, ValueError, KeyError) as exc:
            logger.error("lost the connection to the machine shim: %r", exc)
        finally:
            if not self._closing:
                self._lost_shim()

    def _on_live(self, message: dict[str, Any]) -> None:
        self.shim_pid = int(message["pid"])
        # The shim numbers on from its journal; a lower number means a new journal (deleted).
        shim_seq = int(message.get("seq") or 0)
        self._received = self._acked = (
            self._stored_at_hello if self._stored_at_hello <= shim_seq else 0
        )
        runs = [
            LiveRun(
                run=str(r["run"]),
                key=str(r["key"]),
                pid=int(r["pid"]),
                started_at=_when(float(r["started"])),
                suspended=bool(r["suspended"]),
            )
            for r in message["runs"]
        ]
        # Runs that ended while no server listened: expect() matches them to their machines.
        self._ended = {
            str(e["key"]): (str(e["run"]), int(e["pid"])) for e in message.get("ended", [])
        }
        if self._live is not None and not self._live.done():
            self._live.set_result(runs)

    def _on_replayed(self) -> None:
        for handle in self._recovering.values():
            if handle.exited:
                continue  # its exit came in the replay
            if handle.run is not None:
                self._runs.pop(handle.run, None)
            handle._finish(_lost_exit(LOST_ERROR), None)
            _kill_orphan(handle)
        self._recovering.clear()
        if self._replayed is not None and not self._replayed.done():
            self._replayed.set_result(None)

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message["op"]
        seq = message.get("seq")
        if op == "refused":
            handle = self._launching.get(str(message.get("req")))
            if handle is not None:
                error = f"could not start the process: {message['error']}"
                handle._finish(_lost_exit(error, 1), None)
                _resolve(handle._launched)
            return
        if seq is not None:
            self._received = max(self._received, int(seq))
        if op == "launched":
            self._on_launched(message)
            return
        handle = self._runs.get(str(message.get("run")))
        if handle is None:
            return  # a run already recorded (replayed before its acknowledgement): drop
        if op == "out":
            handle._on_output(str(message["s"]), str(message["l"]), _when(float(message["t"])))
        elif op == "exit":
            self._runs.pop(str(message["run"]), None)
            handle._finish(
                ProcessExit(
                    exit_code=int(message["code"]),
                    signal=message.get("signal"),
                    oom_killed=bool(message.get("oom")),
                    requested_stop=bool(message.get("requested")) or handle._requested_stop,
                    error=message.get("error"),
                    exited_at=_when(float(message["at"])),
                ),
                int(seq) if seq is not None else None,
            )

    def _on_launched(self, message: dict[str, Any]) -> None:
        run, key, pid = str(message["run"]), str(message["key"]), int(message["pid"])
        handle = self._launching.get(str(message.get("req")))
        if handle is None or handle.run is not None or handle.key != key:
            # A replayed launch: it belongs to the run the last server was waiting for, if the
            # pid is the one it recorded (or it had not recorded one yet).
            handle = self._recovering.get(key)
            if handle is None or handle.exited or (handle.pid and handle.pid != pid):
                return
        handle.run = run
        handle.pid = pid
        handle.started_at = _when(float(message["started"]))
        self._runs[run] = handle
        _resolve(handle._launched)

    def _lost_shim(self) -> None:
        """The shim died: its processes' exits cannot be known any more."""
        self._writer = None
        for handle in [*self._runs.values(), *self._launching.values(), *self._recovering.values()]:
            handle._finish(_lost_exit(SHIM_DIED_ERROR), None)
            _kill_orphan(handle)
            _resolve(handle._launched)
        self._runs.clear()
        self._recovering.clear()
        for future in (self._live, self._replayed):
            if future is not None and not future.done():
                future.set_exception(ShimError("the machine shim closed the connection"))

    # acknowledgements --------------------------------------------------------------------------

    def _released(self, handle: RemoteHandle) -> None:
        self._unsettled.pop(id(handle), None)

    def position(self) -> int:
        """The last record whose effects are all stored once buffered log lines are: every
        line received (they are buffered synchronously), and every exit up to the first one
        whose event is not recorded yet."""
        safe = self._received
        if self._unsettled:
            safe = min(safe, min(self._unsettled.values()) - 1)
        return safe

    def _send_ack(self) -> None:
        safe = self.position()
        if safe > self._acked:
            self.flush()  # the lines up to `safe` are in the database before the shim forgets
            self._write({"op": "ack", "seq": safe})
            self._acked = safe

    async def _ack_loop(self) -> None:
        while True:
            await asyncio.sleep(_ACK_INTERVAL)
            self._send_ack()


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _lost_exit(error: str, code: int = LOST_EXIT_CODE) -> ProcessExit:
    return ProcessExit(
        exit_code=code,
        signal=None,
        oom_killed=False,
        requested_stop=False,
        error=error,
        exited_at=utc_now(),
    )


def _kill_orphan(handle: RemoteHandle) -> None:
    # The shim is gone but its process may live on (re-parented to init): nothing could ever
    # report its exit, so it must not run on unsupervised.
    if handle.pid > 1 and pid_alive(handle.pid, handle.started_at):
        logger.warning(
            "killing process %s of machine %s: nobody supervises it", handle.pid, handle.key
        )
        kill_orphan_group(handle.pid, handle.started_at)
