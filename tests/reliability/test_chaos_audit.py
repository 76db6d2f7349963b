"""The chaos harness's judge (bench/chaos.py) calls each kind of failure by its name.

A harness that never fails proves nothing: these feed it made-up ledger rows, markers and
machine counts and check the verdicts.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"


@pytest.fixture(scope="module")
def chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaos_harness", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def row(state: str, exit_code: int | None, run_id: str = "01RUN") -> Any:
    return SimpleNamespace(id=run_id, state=state, exit_code=exit_code, reason=None)


def verdict(chaos: ModuleType, item: Any, rows: list[Any], mark: Any, machines: list[int]) -> str:
    verdicts = chaos.Verdicts()
    verdicts.judge(item, rows, mark, machines)
    found = [k for k in ("duplicate", "lost", "wrong", "not_run") if getattr(verdicts, k)]
    return ",".join(found) or "ok"


@pytest.mark.parametrize(
    ("via", "code", "rows", "starts", "ends", "machines", "cli_rc", "expected"),
    [
        ("queue", 0, [("succeeded", 0)], 1, [0], [1], None, "ok"),
        ("queue", 3, [("dead", 3)], 1, [3], [1], None, "ok"),
        ("cli", 3, [("failed", 3)], 1, [3], [1], 3, "ok"),
        ("cli", 3, [("failed", 3)], 1, [3], [1], 74, "ok"),  # 74: resume with wait
        ("queue", 0, [("succeeded", 0)], 2, [0, 0], [1], None, "duplicate"),
        ("queue", 0, [("succeeded", 0)], 1, [0], [2], None, "duplicate"),
        ("queue", 0, [("succeeded", 0), ("succeeded", 0)], 1, [0], [1, 1], None, "duplicate"),
        ("queue", 0, [("running", None)], 1, [], [1], None, "lost"),
        ("queue", 0, [], 1, [0], [], None, "lost"),
        ("queue", 0, [], 0, [], [], None, "lost"),  # enqueued, yet no run
        ("queue", 3, [("succeeded", 0)], 1, [3], [1], None, "wrong"),
        ("queue", 3, [("failed", 4)], 1, [3], [1], None, "wrong"),
        ("queue", 0, [("succeeded", 0)], 0, [], [1], None, "wrong"),  # no exit happened
        ("queue", 0, [("lost", None)], 1, [0], [1], None, "wrong"),  # it did end
        ("queue", 0, [("cancelled", None)], 1, [], [1], None, "wrong"),
        ("cli", 3, [("failed", 3)], 1, [3], [1], 0, "wrong"),
        ("queue", 0, [("create_failed", None)], 0, [], [0], None, "not_run"),
        ("cli", 0, [], 0, [], [], 74, "not_run"),
    ],
)
def test_judge(
    chaos: ModuleType,
    via: str,
    code: int,
    rows: list[tuple[str, int | None]],
    starts: int,
    ends: list[int],
    machines: list[int],
    cli_rc: int | None,
    expected: str,
) -> None:
    item = chaos.Planned(token="chaos-0-00001", via=via, code=code, sleep=0.0, cli_rc=cli_rc)
    ledger = [row(state, exit_code, f"01RUN{i}") for i, (state, exit_code) in enumerate(rows)]
    mark = chaos.Markers(starts=starts, ends=ends)
    assert verdict(chaos, item, ledger, mark, machines) == expected


def test_markers_and_fault_log(chaos: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "chaos-0-00001").write_text("start\nend 3\n")
    (out / "chaos-0-00002").write_text("start\nstart\nend 0\n")
    markers = chaos.read_markers(out)
    assert markers["chaos-0-00001"] == chaos.Markers(starts=1, ends=[3])
    assert markers["chaos-0-00002"] == chaos.Markers(starts=2, ends=[0])
    log = tmp_path / "faults.log"
    log.write_text(
        "instrumented pid=1\n"
        "delayed rate_limit_429 requests POST /v1/apps/a/machines\n"
        "delayed dropped_create requests POST /v1/apps/a/machines\n"
        "delayed requests GET /v1/apps/a/machines/x/wait\n"
        "self_5xx requests GET /v1/apps/a/machines/x/wait\n"
    )
    assert chaos.read_fault_log(log) == {
        "instrumented_servers": 1,
        "delayed": 3,
        "rate_limit_429": 1,
        "dropped_create": 1,
        "requests": 4,
        "self_5xx": 1,
    }
