"""Run the real ``jobrunner`` command as a subprocess, as a user would.

One JOBRUNNER_HOME (ledger + local backend) per test module; the local backend that the CLI
starts in the background is stopped when the module ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jobrunner.local.daemon import stop_server

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Cli:
    home: Path
    env: dict[str, str]

    def __call__(
        self, *args: str, timeout: float = 90.0, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "jobrunner", *args],
            cwd=REPO,
            env={**self.env, **(extra_env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "jobrunner", *args],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def json(self, *args: str) -> Any:
        done = self(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@contextmanager
def isolated_cli(home: Path) -> Iterator[Cli]:
    """A Cli on ``home`` with no Fly or jobrunner settings from the caller's environment; the
    local server it starts is stopped at the end."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FLY_", "JOBRUNNER_"))
    }
    env.update({"JOBRUNNER_HOME": str(home), "JOBRUNNER_LOCAL_PORT": "0", "NO_COLOR": "1"})
    try:
        yield Cli(home, env)
    finally:
        stop_server(home / "local")


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    with isolated_cli(tmp_path_factory.mktemp("cli-home")) as made:
        yield made
