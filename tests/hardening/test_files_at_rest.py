"""Point 2 of issue 9: what jobrunner writes to disk is readable by its owner only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from jobrunner.config import create_private_file, make_private_dir

from ..cli.conftest import Cli

QUICK_JOB = """
image = "python:3.12-slim"
cmd = ["python3", "-c", "print('quiet')"]
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_ledger_and_driver_logs_are_private(fresh_cli: Cli, tmp_path: Path) -> None:
    job = tmp_path / "quick.toml"
    job.write_text(QUICK_JOB)
    started = fresh_cli("run", str(job), "--detach")
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    waited = fresh_cli("wait", run_id)
    assert waited.returncode == 0, waited.stderr

    home = fresh_cli.home
    assert mode(home) == 0o700
    assert mode(home.parent) == 0o700  # every folder jobrunner had to make for it
    db = home / "jobrunner.db"
    assert mode(db) == 0o600
    for sidecar in (home / "jobrunner.db-wal", home / "jobrunner.db-shm"):
        if sidecar.exists():
            assert mode(sidecar) == 0o600, sidecar
    assert mode(home / "drivers") == 0o700
    assert mode(home / "drivers" / f"{run_id}.log") == 0o600
    assert mode(home / "local") == 0o700


def test_existing_folders_and_files_keep_their_mode(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    make_private_dir(shared / "a" / "b")
    assert mode(shared) == 0o755  # the user's own folder is left alone
    assert mode(shared / "a") == 0o700 and mode(shared / "a" / "b") == 0o700
    existing = shared / "ledger.db"
    existing.write_text("")
    os.chmod(existing, 0o640)
    create_private_file(existing)
    assert mode(existing) == 0o640


def test_private_even_with_a_zero_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        make_private_dir(tmp_path / "x" / "y")
        create_private_file(tmp_path / "x" / "y" / "f.db")
    finally:
        os.umask(old)
    assert mode(tmp_path / "x") == 0o700 and mode(tmp_path / "x" / "y") == 0o700
    assert mode(tmp_path / "x" / "y" / "f.db") == 0o600
