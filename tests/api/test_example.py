"""docs/examples/enqueue_100.py against a real `jobrunner worker` subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobrunner.cli import COMMANDS
from tests.api.conftest import until_sync

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "examples" / "enqueue_100.py"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif("worker" not in COMMANDS, reason="waits on the `jobrunner worker` command")
def test_enqueue_100_example_succeeds_with_a_worker(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "JOBRUNNER_"))}
    env.update({"JOBRUNNER_HOME": str(home), "JOBRUNNER_LOCAL_PORT": "0", "NO_COLOR": "1"})
    worker_log = tmp_path / "worker.log"
    script_log = tmp_path / "script.log"

    def jobrunner(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "jobrunner", *args],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )

    worker: subprocess.Popen[bytes] | None = None
    try:
        with open(worker_log, "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "jobrunner", "worker", "--grace", "5"],
                cwd=tmp_path,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # The worker has started the local backend and serves the queue once it says so.
        until_sync(lambda: b"serving" in worker_log.read_bytes() or worker.poll() is not None, 120)
        assert worker.poll() is None, worker_log.read_text()

        with open(script_log, "wb") as log:
            done = subprocess.run(
                [sys.executable, str(EXAMPLE)],
                cwd=tmp_path,
                env={**env, "ENQUEUE_100_TIMEOUT": "300"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=420,
            )
        output = script_log.read_text()
        assert done.returncode == 0, f"{output}\n--- worker ---\n{worker_log.read_text()}"
        assert "100/100 runs succeeded with the right output" in output
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=30)
        jobrunner("local", "stop")
