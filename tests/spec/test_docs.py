"""docs/jobs.md explains every key a job file may hold (a new key without docs fails here)."""

from __future__ import annotations

from pathlib import Path

from jobrunner.spec.job import ALLOWED_KEYS

JOBS_DOC = (Path(__file__).resolve().parents[2] / "docs" / "jobs.md").read_text()


def test_every_job_file_key_is_documented() -> None:
    missing = [
        f"{table}.{key}" if table else key
        for table, keys in ALLOWED_KEYS.items()
        for key in keys
        # a key is written `key`, or as its table heading `[key]` / `[[key]]`
        if not any(f"`{form}`" in JOBS_DOC for form in (key, f"[{key}]", f"[[{key}]]"))
    ]
    assert missing == []
