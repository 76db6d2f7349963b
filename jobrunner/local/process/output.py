"""Turning a child's output pipes into ordered, timestamped lines, without threads.

`LineSplitter` is the pure part (bytes in, lines out); `OutputPipeProtocol` wires one to an asyncio
read-pipe transport, so hundreds of processes are read by the event loop alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

__all__ = [
    "MAX_LINE_BYTES",
    "CollectPipeProtocol",
    "LineSink",
    "LineSplitter",
    "OutputPipeProtocol",
    "WritePipeProtocol",
    "utc_now",
]

logger = logging.getLogger(__name__)

#: A line longer than this is delivered in pieces of at most this many bytes, so one process that
#: prints megabytes without a newline cannot grow the supervisor's memory without bound.
MAX_LINE_BYTES = 64 * 1024

#: Receives (stream name, line without newline, timestamp).
LineSink = Callable[[str, str, datetime], None]


def utc_now() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


def _utf8_safe_cut(buffer: bytearray, start: int, limit: int) -> int:
    """The absolute position to cut a too-long line that starts at `start`.

    It is at most `start + limit` and does not split a UTF-8 multi-byte character (backing off
    over at most 3 continuation bytes); for data that is not UTF-8 it is `start + limit`.
    """
    candidate = start + limit
    cut = candidate
    for _ in range(3):
        if (buffer[cut] & 0xC0) != 0x80:
            break
        cut -= 1
    if cut <= start or (buffer[cut] & 0xC0) == 0x80:
        return candidate
    return cut


class LineSplitter:
    """Splits a byte stream into lines and hands each one to `sink`, in order.

    A trailing "\\n" is removed; bytes are decoded as UTF-8 with replacement characters, so binary
    output never raises. Lines longer than `max_line` bytes are split. `finish()` delivers a
    partial last line (output that did not end with a newline).
    """

    def __init__(self, stream: str, sink: LineSink, max_line: int = MAX_LINE_BYTES) -> None:
        self.stream = stream
        self._sink = sink
        self._max_line = max_line
        self._buffer = bytearray()

    def feed(self, data: bytes, at: datetime) -> None:
        """Add a chunk read from the pipe; every complete line in it is delivered now."""
        self._buffer += data
        start = 0
        buffer = self._buffer
        while True:
            newline = buffer.find(b"\n", start)
            end = len(buffer) if newline < 0 else newline
            if end - start > self._max_line:
                cut = _utf8_safe_cut(buffer, start, self._max_line)
                self._emit(bytes(buffer[start:cut]), at)
                start = cut
                continue
            if newline < 0:
                break
            self._emit(bytes(buffer[start:newline]), at)
            start = newline + 1
        del buffer[:start]

    def finish(self, at: datetime) -> None:
        """End of stream: deliver whatever is left as a last line."""
        if self._buffer:
            rest = bytes(self._buffer)
            self._buffer.clear()
            self._emit(rest, at)

    def _emit(self, raw: bytes, at: datetime) -> None:
        line = raw.decode("utf-8", errors="replace")
        try:
            self._sink(self.stream, line, at)
        except Exception:
            # The caller's callback failing must not stop us draining the pipe: a full pipe would
            # block the job forever.
            logger.exception(
                "output callback failed for a %s line", self.stream, extra={"action": "output"}
            )


class OutputPipeProtocol(asyncio.Protocol):
    """Feeds one pipe (the child's stdout or stderr) into a `LineSplitter`.

    `done` resolves once the pipe is closed, after the partial last line was delivered.
    """

    def __init__(self, splitter: LineSplitter) -> None:
        self._splitter = splitter
        self.transport: asyncio.BaseTransport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._splitter.feed(data, utc_now())

    def eof_received(self) -> bool | None:
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._splitter.finish(utc_now())
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        """Stop reading now (used when a leftover process keeps the pipe open)."""
        if self.transport is not None:
            self.transport.close()


class CollectPipeProtocol(asyncio.Protocol):
    """Collects everything written to a pipe until it is closed (the launcher's status pipe)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(b"".join(self._chunks))


class WritePipeProtocol(asyncio.Protocol):
    """Write side of the spec pipe; `done` resolves when the pipe is closed (sent or broken)."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        # A broken pipe means the launcher died before reading its spec; its exit status and
        # stderr say why, so the write error itself carries no extra information.
        if not self.done.done():
            self.done.set_result(None)
