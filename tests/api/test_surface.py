"""The API's public surface: lazy exports from the package root, and docs/api.md covering it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import jobrunner
from jobrunner.api import AsyncJobRunner, JobRunner
from jobrunner.handles import AsyncRunHandle, RunExecutor, RunHandle, RunResult

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
EXPORTS = ["AsyncJobRunner", "Job", "JobRunner", "RunHandle", "RunResult", "RunState"]


def test_the_api_names_import_lazily_from_the_package_root() -> None:
    code = (
        "import sys, jobrunner; assert 'jobrunner.api' not in sys.modules; "
        f"from jobrunner import {', '.join([*EXPORTS, 'as_completed'])}; "
        "assert 'jobrunner.api' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert set(EXPORTS) | {"as_completed", "AsyncRunHandle", "QueueOptions"} <= set(
        jobrunner.__all__
    )
    assert sorted(jobrunner.__all__) == jobrunner.__all__
    assert jobrunner.RunHandle is RunHandle and jobrunner.JobRunner is JobRunner


def public(cls: type) -> set[str]:
    return {name for name in vars(cls) if not name.startswith("_")}


def test_every_public_name_is_documented() -> None:
    text = DOC.read_text()
    names = (
        public(JobRunner)
        | public(AsyncJobRunner)
        | public(RunHandle)
        | public(AsyncRunHandle)
        | {"id", "state", "record", "ok", "as_completed", "shutdown", "executor"}
        | set(RunResult.__dataclass_fields__)
    )
    names -= {"from_records", "jobs_dir", "poll_interval", "settings", "runner", "open"}
    missing = sorted(name for name in names if not re.search(rf"\b{name}\b", text))
    assert missing == []
    assert "submit" in public(RunExecutor)


def test_the_python_examples_in_the_doc_are_valid_python() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 10
    for block in blocks:
        ast.parse(block)
