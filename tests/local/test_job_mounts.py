"""Job files' ``[[mounts]]``: jobs share data through a named volume of the local backend."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from jobrunner import AsyncJobRunner
from jobrunner.spec import load_job
from jobrunner.states import RunState

from .local_harness import APP, TOKEN, ServerProcess, start_server

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a volume needs a private mount namespace (root)"
)
WAIT = 60.0


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    """A server in ``$JOBRUNNER_HOME/local``, so jobrunner's own session finds and uses it."""
    home = tmp_path / "home"
    server = start_server(home / "local")
    monkeypatch.setenv("JOBRUNNER_HOME", str(home))
    monkeypatch.setenv("JOBRUNNER_LOCAL_TOKEN", TOKEN)
    monkeypatch.setenv("JOBRUNNER_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        yield server
    finally:
        server.stop()


def job_file(folder: Path, name: str, script: str, volume: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(
        f'image = "alpine"\ncmd = ["sh", "-c", {script!r}]\n\n'
        f'[[mounts]]\nvolume = "{volume}"\npath = "/data"\n'
    )
    return path


async def test_jobs_mount_a_volume_by_name(backend: ServerProcess, tmp_path: Path) -> None:
    with httpx.Client(base_url=backend.base_url, headers=backend.headers()) as api:
        created = api.post(f"/v1/apps/{APP}/volumes", json={"name": "results"})
        assert created.status_code == 200, created.text
    writer = load_job(job_file(tmp_path, "writer", "echo from-the-writer > /data/x", "results"))
    reader = load_job(job_file(tmp_path, "reader", "cat /data/x", "results"))
    missing = load_job(job_file(tmp_path, "missing", "true", "nosuchvolume"))
    async with AsyncJobRunner.from_env() as jr:
        wrote = await jr.run(writer, timeout=WAIT)
        assert (wrote.outcome, wrote.exit_code) == (RunState.SUCCEEDED, 0), wrote.reason
        read = await jr.submit(reader)
        result = await read.wait(timeout=WAIT)
        assert result.outcome == RunState.SUCCEEDED, result.reason
        assert await read.logs() == ["from-the-writer"]

        failed = await jr.run(missing, timeout=WAIT)
        assert failed.outcome == RunState.CREATE_FAILED
        assert failed.reason is not None
        assert "'nosuchvolume' not found" in failed.reason
        assert "fly volumes create nosuchvolume" in failed.reason
    volume_dir = backend.state_dir / "volumes"
    (only,) = volume_dir.iterdir()
    assert (only / "x").read_text() == "from-the-writer\n"
