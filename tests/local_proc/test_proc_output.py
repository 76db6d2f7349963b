"""Output: lines per stream in order, timestamps, partial last lines, very long lines."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from jobrunner.local.process.output import MAX_LINE_BYTES, LineSplitter
from jobrunner.local.process.supervisor import ProcessSpec, launch

from .conftest import Starter, python

AT = datetime(2024, 1, 1, tzinfo=UTC)


async def test_lines_arrive_in_order_on_both_streams_with_utc_timestamps(start: Starter) -> None:
    code = (
        "import sys\n"
        "for i in range(200):\n"
        "    print(f'out {i}')\n"
        "    print(f'err {i}', file=sys.stderr)\n"
    )
    handle, output = await start(python(code))
    result = await handle.wait()
    assert result.exit_code == 0
    assert output.lines("stdout") == [f"out {i}" for i in range(200)]
    assert output.lines("stderr") == [f"err {i}" for i in range(200)]
    for stream in ("stdout", "stderr"):
        stamps = [at for s, _, at in output.records if s == stream]
        assert all(at.utcoffset() == timedelta(0) for at in stamps)
        assert stamps == sorted(stamps)
        assert handle.started_at <= stamps[0] and stamps[-1] <= result.exited_at


async def test_partial_last_line_is_delivered_at_exit(start: Starter) -> None:
    handle, output = await start(["sh", "-c", "printf 'one\\ntwo'; printf 'half' >&2"])
    await handle.wait()
    assert output.lines("stdout") == ["one", "two"]
    assert output.lines("stderr") == ["half"]


async def test_empty_lines_are_kept(start: Starter) -> None:
    handle, output = await start(["sh", "-c", "printf 'a\\n\\nb\\n'"])
    await handle.wait()
    assert output.lines() == ["a", "", "b"]


async def test_very_long_line_is_split_not_fatal(start: Starter) -> None:
    handle, output = await start(python("print('x' * 200_000); print('end')"))
    result = await handle.wait()
    assert result.exit_code == 0
    lines = output.lines()
    assert lines[-1] == "end"
    assert "".join(lines[:-1]) == "x" * 200_000
    assert max(len(line) for line in lines) == MAX_LINE_BYTES


async def test_binary_output_is_decoded_with_replacement(start: Starter) -> None:
    handle, output = await start(["sh", "-c", "printf 'ok \\377\\n'"])
    await handle.wait()
    assert output.lines() == ["ok \ufffd"]


async def test_a_failing_callback_does_not_stop_the_reader(workdir: Path) -> None:
    seen: list[str] = []

    def sink(stream: str, line: str, at: datetime) -> None:
        seen.append(line)
        raise RuntimeError("bug in the caller's callback")

    spec = ProcessSpec(
        argv=python("for i in range(3): print(i)"),
        env={},
        files=[],
        cpus=None,
        memory_mb=None,
        workdir=workdir,
    )
    handle = await launch(spec, sink)
    result = await asyncio.wait_for(handle.wait(), 10)
    assert result.exit_code == 0
    assert seen == ["0", "1", "2"]


def test_splitter_keeps_multibyte_characters_whole() -> None:
    got: list[str] = []
    splitter = LineSplitter("stdout", lambda s, line, at: got.append(line), max_line=10)
    text = "é" * 12  # 24 bytes, every character two bytes
    splitter.feed(text.encode()[:7], AT)
    splitter.feed(text.encode()[7:] + b"\n", AT)
    assert "".join(got) == text
    assert all("\ufffd" not in piece for piece in got)
    assert all(len(piece.encode()) <= 10 for piece in got)


def test_splitter_reassembles_lines_across_chunks_and_survives_a_raising_sink() -> None:
    got: list[str] = []

    def sink(stream: str, line: str, at: datetime) -> None:
        got.append(line)
        if line == "boom":
            raise RuntimeError("callback bug")

    splitter = LineSplitter("stderr", sink)
    for chunk in (b"he", b"llo\nbo", b"om\nwor", b"ld"):
        splitter.feed(chunk, AT)
    splitter.finish(AT)
    splitter.finish(AT)  # nothing left: no duplicate
    assert got == ["hello", "boom", "world"]
