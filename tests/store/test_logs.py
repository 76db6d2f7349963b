"""Log lines: stored once however often they are fetched, read back in order."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from jobrunner.store import LogLineIn, Run, Store

RunFactory = Callable[..., Run]
T0 = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


def _line(n: int, *, entry_id: str | None = None, stream: str = "stdout") -> LogLineIn:
    return LogLineIn(
        ts=T0 + timedelta(seconds=n), message=f"line {n}", stream=stream, entry_id=entry_id
    )


def test_add_logs_counts_only_new_lines(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    page_one = [_line(1, entry_id="a"), _line(2, entry_id="b")]
    page_two = [_line(2, entry_id="b"), _line(3, entry_id="c")]

    assert store.add_logs(run.id, 1, page_one) == 2
    assert store.add_logs(run.id, 1, page_two) == 1
    assert store.add_logs(run.id, 1, page_two) == 0
    assert store.add_logs(run.id, 1, []) == 0

    lines = store.get_logs(run.id)
    assert [(line.entry_id, line.message) for line in lines] == [
        ("a", "line 1"),
        ("b", "line 2"),
        ("c", "line 3"),
    ]
    assert lines[0].ts == T0 + timedelta(seconds=1)
    assert lines[0].ts.tzinfo is not None


def test_lines_without_an_id_are_deduplicated_by_content(
    store: Store, make_run: RunFactory
) -> None:
    run = make_run()
    batch = [_line(1), _line(1), _line(1, stream="stderr"), _line(2)]

    assert store.add_logs(run.id, 1, batch) == 3
    assert store.add_logs(run.id, 1, batch) == 0
    assert [(line.stream, line.message) for line in store.get_logs(run.id)] == [
        ("stdout", "line 1"),
        ("stderr", "line 1"),
        ("stdout", "line 2"),
    ]


def test_same_entry_id_in_another_attempt_or_run_is_a_new_line(
    store: Store, make_run: RunFactory
) -> None:
    run, other = make_run(max_attempts=2), make_run()

    assert store.add_logs(run.id, 1, [_line(1, entry_id="x")]) == 1
    assert store.add_logs(run.id, 2, [_line(1, entry_id="x")]) == 1
    assert store.add_logs(other.id, 1, [_line(1, entry_id="x")]) == 1
    assert [line.attempt_number for line in store.get_logs(run.id)] == [1, 2]


def test_get_logs_pages_with_after_id_and_limit(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    store.add_logs(run.id, 1, [_line(n, entry_id=str(n)) for n in range(10)])

    first = store.get_logs(run.id, limit=4)
    rest = store.get_logs(run.id, after_id=first[-1].id)

    assert [line.message for line in first + rest] == [f"line {n}" for n in range(10)]
    assert store.get_logs(run.id, after_id=rest[-1].id) == []


def test_naive_timestamps_are_refused(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    with pytest.raises(ValueError, match="timezone-aware"):
        store.add_logs(run.id, 1, [LogLineIn(ts=datetime(2025, 1, 1), message="x")])
