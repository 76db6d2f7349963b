"""Helpers for the store's contract tests (the ``store`` fixture is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from jobrunner.store import Run, Store

RunFactory = Callable[..., Run]


@pytest.fixture
def make_run(store: Store) -> RunFactory:
    """``make_run(**overrides)`` creates a pending run with sensible defaults."""

    def make(**overrides: Any) -> Run:
        values: dict[str, Any] = {
            "job_name": "hello",
            "job_snapshot": {"name": "hello", "image": "python:3.12-slim", "cmd": ["true"]},
            "backend": "local",
            "app": "jobrunner-local",
            "region": None,
            "max_attempts": 1,
            "timeout_s": None,
            "trigger": "cli",
        }
        values.update(overrides)
        return store.create_run(**values)

    return make
