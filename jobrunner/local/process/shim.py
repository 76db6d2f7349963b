"""The machine shim: the long-lived parent of every local machine's process, one per state dir.

The API server (server.py) can die, be killed or be upgraded while machines run; on Fly a machine
keeps running whatever happens to the process that created it, and its exit is still recorded.
So the server does not own the processes: this small process does (like containerd's shim or
conmon). It is started detached by the server (``python -m jobrunner.local.process.shim
STATE_DIR``: own session, stdin /dev/null, output to ``shim.log``), and it

* starts jobs with ``supervisor.launch`` (posix_spawn of the job itself, or the launcher for
  machines with files or mounts), reads their output and reaps them, as the server used to;
* is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so a job's orphaned descendants are
  re-parented here and reaped here, not by init;
* numbers every record it produces (a process launched, an output line, an exit) and keeps it, in
  memory and appended to ``shim.journal`` (0600), until the server acknowledges having stored it;
  a server that comes back gets the live processes and every record it did not acknowledge;
* exits once no server is connected, no process runs and nothing is left to deliver.

Protocol: one JSON object per line over ``shim.sock`` (a unix socket, 0600, in the 0700 state
dir). Server to shim: ``hello``, ``launch``, ``stop``, ``signal``, ``suspend``, ``resume``,
``kill``, ``ack``, ``bye``. Shim to server: ``live`` then the unacknowledged records then
``replayed`` after a hello; ``launched``, ``out`` and ``exit`` records (each with ``seq``); and
``refused`` for a launch it could not even attempt.

This module imports only the stdlib and the supervisor, never the HTTP server: it starts once per
state dir, not once per machine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import pickle
import signal
import sys
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from jobrunner.local.process.supervisor import (
    ProcessExit,
    ProcessHandle,
    ProcessSpec,
    launch,
    own_children,
)

__all__ = [
    "JOURNAL_FILE",
    "SHIM_LOCK_FILE",
    "SHIM_LOG_FILE",
    "SOCKET_FILE",
    "Shim",
    "decode_spec",
    "encode_spec",
    "main",
]

logger = logging.getLogger("jobrunner.local.process.shim")

SOCKET_FILE = "shim.sock"
SHIM_LOCK_FILE = "shim.lock"
SHIM_LOG_FILE = "shim.log"
JOURNAL_FILE = "shim.journal"
#: How long an idle shim with nobody connected waits for a server before it exits.
IDLE_EXIT_DELAY = 1.0
#: Rewrite the journal without its acknowledged records once they take this many bytes.
_COMPACT_BYTES = 1 << 20
_PR_SET_CHILD_SUBREAPER = 36
_STATE_DIR_CHECK = 5.0
_ORPHAN_SWEEP = 1.0
_LINE_LIMIT = 1 << 24


def encode_spec(spec: ProcessSpec) -> str:
    """A ProcessSpec for the wire.

    pickle, because the spec is a tree of dataclasses that other modules extend (mounts), and
    both ends run the same code; the socket only accepts its owner (0600 in a 0700 dir).
    """
    return base64.b64encode(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)).decode()


def decode_spec(data: str) -> ProcessSpec:
    # Written by our own server (see encode_spec).
    spec = pickle.loads(base64.b64decode(data))
    if not isinstance(spec, ProcessSpec):
        raise ValueError(f"not a ProcessSpec: {type(spec).__name__}")
    return spec


def exit_record(exit_: ProcessExit) -> dict[str, Any]:
    return {
        "code": exit_.exit_code,
        "signal": exit_.signal,
        "oom": exit_.oom_killed,
        "requested": exit_.requested_stop,
        "error": exit_.error,
        "at": exit_.exited_at.timestamp(),
    }


@dataclass
class _Run:
    """One launched process."""

    run: str
    key: str
    handle: ProcessHandle | None = None
    early: list[dict[str, Any]] = field(default_factory=list)  # output before "launched"


class Shim:
    """The shim's state; ``serve()`` runs it until it has nothing left to do."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.runs: dict[str, _Run] = {}
        self.ended: dict[str, dict[str, Any]] = {}  # run -> {run, key, pid, seq} until acked
        self.outbox: deque[tuple[int, bytes]] = deque()
        self.seq = 0
        self._prefix = f"{time.time_ns():x}"
        self._counter = 0
        self._writer: asyncio.StreamWriter | None = None
        self._journal = -1
        self._journal_buffer = bytearray()
        self._journal_bytes = 0
        self._flush_scheduled = False
        self._done = asyncio.Event()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # records ----------------------------------------------------------------------------

    def _record(self, message: dict[str, Any]) -> None:
        """Number, journal and (when a server is connected) send one record."""
        self.seq += 1
        message["seq"] = self.seq
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        self.outbox.append((self.seq, line))
        self._journal_buffer += line
        if not self._flush_scheduled:
            # One write per loop iteration, not one per line.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_journal)
        self._send(line)

    def _send(self, line: bytes) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(line)

    def _flush_journal(self) -> None:
        self._flush_scheduled = False
        if self._journal_buffer and self._journal >= 0:
            try:
                os.write(self._journal, self._journal_buffer)
                self._journal_bytes += len(self._journal_buffer)
            except OSError as exc:
                logger.error("cannot write %s: %s", JOURNAL_FILE, exc)
        self._journal_buffer.clear()

    def _ack(self, seq: int) -> None:
        while self.outbox and self.outbox[0][0] <= seq:
            self.outbox.popleft()
        for run, ended in list(self.ended.items()):
            if ended["seq"] <= seq:
                del self.ended[run]
        if self._journal < 0:
            return
        self._flush_journal()
        if not self.outbox:
            # Keep the number: a later shim continues it, so numbers never go back.
            os.ftruncate(self._journal, 0)
            mark = json.dumps({"op": "mark", "seq": self.seq}).encode() + b"\n"
            os.write(self._journal, mark)
            self._journal_bytes = len(mark)
        elif self._journal_bytes > _COMPACT_BYTES:
            data = b"".join(line for _, line in self.outbox)
            os.ftruncate(self._journal, 0)
            os.write(self._journal, data)
            self._journal_bytes = len(data)
        self._check_idle()

    def _load_journal(self) -> None:
        path = self.state_dir / JOURNAL_FILE
        self._journal = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with open(self._journal, "rb", closefd=False) as fh:
            for raw in fh:
                try:
                    message = json.loads(raw)
                    seq = int(message["seq"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a shim killed mid-write
                self.seq = max(self.seq, seq)
                if message.get("op") == "mark":
                    continue
                self.outbox.append((seq, raw if raw.endswith(b"\n") else raw + b"\n"))
                if message.get("op") == "exit":
                    self.ended[str(message["run"])] = {
                        "run": message["run"], "key": message["key"],
                        "pid": message["pid"], "seq": seq,
                    }  # fmt: skip
        self._journal_bytes = os.fstat(self._journal).st_size
        if self.outbox:
            logger.info("%d undelivered records from a previous shim", len(self.outbox))

    # running processes ----------------------------------------------------------------------

    def _launch(self, message: dict[str, Any]) -> None:
        self._counter += 1
        run = _Run(run=f"{self._prefix}-{self._counter}", key=str(message["key"]))
        self.runs[run.run] = run
        try:
            spec = decode_spec(message["spec"])
        except Exception as exc:  # a version mismatch; the server reports it as a failed start
            self.runs.pop(run.run)
            self._send_now({"op": "refused", "req": message.get("req"), "error": repr(exc)})
            return
        self._spawn(self._run(run, spec, message.get("req"), message.get("memory", "auto")))

    async def _run(self, run: _Run, spec: ProcessSpec, req: Any, memory: str) -> None:
        def on_output(stream: str, line: str, when: datetime) -> None:
            record = {"op": "out", "run": run.run, "s": stream, "l": line, "t": when.timestamp()}
            if run.handle is None:
                run.early.append(record)
            else:
                self._record(record)

        try:
            handle = await launch(spec, on_output, memory_enforcement=memory)  # type: ignore[arg-type]
        except Exception as exc:
            logger.exception("launching %s failed", run.key)
            self.runs.pop(run.run, None)
            self._send_now({"op": "refused", "req": req, "error": repr(exc)})
            self._check_idle()
            return
        run.handle = handle
        self._record(
            {
                "op": "launched",
                "req": req,
                "run": run.run,
                "key": run.key,
                "pid": handle.pid,
                "started": handle.started_at.timestamp(),
            }
        )
        for record in run.early:
            self._record(record)
        run.early.clear()
        exit_ = await handle.wait()
        self.runs.pop(run.run, None)
        self._record(
            {"op": "exit", "run": run.run, "key": run.key, "pid": handle.pid, **exit_record(exit_)}
        )
        # Until the exit is acknowledged, a new server must be able to tell whose run it was.
        self.ended[run.run] = {"run": run.run, "key": run.key, "pid": handle.pid, "seq": self.seq}
        self._check_idle()

    def _control(self, message: dict[str, Any]) -> None:
        run = self.runs.get(str(message.get("run")))
        handle = run.handle if run is not None else None
        if handle is None:
            return  # already gone: its exit record tells the server
        op = message["op"]
        if op == "stop":
            self._spawn(handle.stop(int(message["signal"]), float(message["timeout"])))
        elif op == "signal":
            handle.send_signal(int(message["signal"]))
        elif op == "suspend":
            handle.suspend()
        elif op == "resume":
            handle.resume()
        elif op == "kill":
            handle.kill()

    # the server connection --------------------------------------------------------------------

    def _send_now(self, message: dict[str, Any]) -> None:
        self._send(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                op = message.get("op")
                if op == "hello":
                    self._hello(writer, int(message.get("ack") or 0))
                elif writer is not self._writer:
                    continue  # a connection that a newer server's hello replaced
                elif op == "launch":
                    self._launch(message)
                elif op == "ack":
                    self._ack(int(message["seq"]))
                elif op == "bye":
                    break
                else:
                    self._control(message)
        except (ConnectionError, ValueError) as exc:
            logger.warning("server connection ended: %s", exc)
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            self._check_idle()

    def _hello(self, writer: asyncio.StreamWriter, ack: int) -> None:
        # Only one server may use a state dir (server.lock), so the newest hello wins: the older
        # connection belongs to a server that died and whose socket the kernel has not closed yet.
        old, self._writer = self._writer, writer
        if old is not None and old is not writer:
            old.close()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if ack <= self.seq:  # what the server stored before it died: not sent again
            self._ack(ack)
        live = [
            {
                "run": run.run,
                "key": run.key,
                "pid": run.handle.pid,
                "started": run.handle.started_at.timestamp(),
                "suspended": run.handle._suspended,
            }
            for run in self.runs.values()
            if run.handle is not None and not run.handle.exited
        ]
        ended = list(self.ended.values())
        self._send_now(
            {"op": "live", "pid": os.getpid(), "seq": self.seq, "runs": live, "ended": ended}
        )
        for _, line in self.outbox:
            self._send(line)
        self._send_now({"op": "replayed", "seq": self.seq})

    # lifetime ---------------------------------------------------------------------------------

    def _check_idle(self) -> None:
        idle = self._writer is None and not self.runs and not self.outbox
        if idle and self._idle_timer is None:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(IDLE_EXIT_DELAY, self._exit_if_idle)

    def _exit_if_idle(self) -> None:
        self._idle_timer = None
        if self._writer is None and not self.runs and not self.outbox:
            self._done.set()

    async def _watch_state_dir(self, socket_path: Path) -> None:
        """Exit, ending the jobs, once the state dir (our socket) is gone: no server could ever
        connect again to collect their exits, and nothing else would ever end them."""
        while True:
            await asyncio.sleep(_STATE_DIR_CHECK)
            if not socket_path.exists():
                logger.warning(
                    "%s is gone: killing %d machine(s) and exiting", socket_path, len(self.runs)
                )
                for run in self.runs.values():
                    if run.handle is not None:
                        run.handle.kill()
                await asyncio.gather(
                    *(r.handle.wait() for r in self.runs.values() if r.handle is not None)
                )
                self._done.set()
                return

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep_orphans(self) -> None:
        # A timer, not a SIGCHLD handler: uvloop keeps SIGCHLD for itself, and a zombie that
        # waits a second costs nothing but a process table slot.
        while True:
            await asyncio.sleep(_ORPHAN_SWEEP)
            self._reap_orphans()

    def _reap_orphans(self) -> None:
        """Reap re-parented descendants of jobs (we are their subreaper), never our own jobs."""
        mine = own_children()
        try:
            tasks = os.listdir("/proc/self/task")
        except OSError:
            return
        for tid in tasks:
            try:
                children = Path(f"/proc/self/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in mine:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(child, os.WNOHANG)

    async def serve(self) -> None:
        self._load_journal()
        path = self.state_dir / SOCKET_FILE
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a shim that was killed; we hold the lock now
        old_mask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._connection, path, limit=_LINE_LIMIT)
        finally:
            os.umask(old_mask)
        self._spawn(self._sweep_orphans())
        self._check_idle()
        self._spawn(self._watch_state_dir(path))
        try:
            await self._done.wait()
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        logger.info("nothing left to supervise; exiting")


def _become_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    except (OSError, AttributeError) as exc:
        logger.warning("cannot become a child subreaper (%s): orphans go to init", exc)


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where installed (less CPU per machine; see bench/local_backend_bench.py)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    """``python -m jobrunner.local.process.shim STATE_DIR``: exit 0 when done or when one
    already runs."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m jobrunner.local.process.shim STATE_DIR", file=sys.stderr)
        return 2
    state_dir = Path(args[0]).absolute()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s shim[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    lock = os.open(state_dir / SHIM_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another shim serves this state dir; the server connects to it
    # Paths below are absolute; "/" keeps no directory busy (jobs get their own cwd at spawn).
    os.chdir("/")
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        # The jobs must outlive a hang-up or a Ctrl-C meant for whoever started the server.
        signal.signal(sig, signal.SIG_IGN)
    _become_subreaper()
    logger.info("supervising machines of %s", state_dir)
    _run(Shim(state_dir).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
