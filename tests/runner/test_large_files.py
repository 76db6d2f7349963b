"""Jobs with large files on the local backend: the machine gets the exact bytes, which the
ledger holds once however many runs there are (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from jobrunner.runner import Runner
from jobrunner.spec import Job
from jobrunner.store import Store

MIB = 1024 * 1024


def checksum_job(tmp_path: Path, data: bytes, text: str) -> Job:
    (tmp_path / "big.bin").write_bytes(data)
    return Job.parse(
        {
            "name": "checksum",
            "image": "alpine",
            "cmd": ["sh", "-c", "sha256sum /srv/big.bin /etc/big.txt"],
            "files": [
                {"guest_path": "/srv/big.bin", "source": "big.bin"},
                {"guest_path": "/etc/big.txt", "content": text},
            ],
        },
        source_path=tmp_path / "checksum.toml",
    )


def digests(store: Store, run_id: str) -> dict[str, str]:
    out = {}
    for line in store.get_logs(run_id):
        digest, path = line.message.split()
        out[path] = digest
    return out


async def test_the_machine_gets_the_exact_bytes_stored_once(
    runner: Runner, store: Store, tmp_path: Path
) -> None:
    data = os.urandom(3 * MIB)  # under the 4 MiB a file may hold
    text = "".join(f"line {i}\n" for i in range(100_000))  # about 1 MB of content
    job = checksum_job(tmp_path, data, text)
    expected = {
        "/srv/big.bin": hashlib.sha256(data).hexdigest(),
        "/etc/big.txt": hashlib.sha256(text.encode()).hexdigest(),
    }

    runs = [await runner.run(job) for _ in range(3)]

    for run in runs:
        assert run.state == "succeeded", run.reason
        assert digests(store, run.id) == expected
        assert len(str(run.job_snapshot)) < 2_000  # digests, not bytes
    assert store.blob_usage() == (2, len(data) + len(text))


async def test_a_run_recorded_with_inline_files_still_runs(
    runner: Runner, store: Store, tmp_path: Path
) -> None:
    # A snapshot as the version before the blob store wrote it (written after the migration,
    # so still inline): base64 raw_value and content text in the run row itself.
    data = os.urandom(MIB)
    text = "x" * 50_000
    inline = {
        "name": "legacy",
        "image": "alpine",
        "cmd": ["sh", "-c", "sha256sum /srv/big.bin /etc/big.txt"],
        "files": [
            {
                "guest_path": "/srv/big.bin",
                "source": "big.bin",
                "raw_value": base64.b64encode(data).decode(),
            },
            {"guest_path": "/etc/big.txt", "content": text},
        ],
        "format": 1,
        "source_path": None,
    }
    run = store.create_run(
        job_name="legacy",
        job_snapshot=inline,
        backend="local",
        app="jobrunner-local",
        region=None,
        max_attempts=1,
        timeout_s=None,
    )
    assert store.blob_usage() == (0, 0)

    final = await runner.wait(run.id, poll=0.1)
    await runner.logs_settled(run.id)

    assert final.state == "succeeded", final.reason
    assert digests(store, run.id) == {
        "/srv/big.bin": hashlib.sha256(data).hexdigest(),
        "/etc/big.txt": hashlib.sha256(text.encode()).hexdigest(),
    }


async def test_a_missing_blob_fails_the_attempt_with_a_reason(
    runner: Runner, store: Store, tmp_path: Path
) -> None:
    job = checksum_job(tmp_path, os.urandom(100_000), "small")
    snapshot = job.snapshot()
    run = store.create_run(
        job_name=job.name,
        job_snapshot=snapshot,
        backend="local",
        app="jobrunner-local",
        region=None,
        max_attempts=1,
        timeout_s=None,
    )
    with store._write() as db:  # the bytes lost behind the ledger's back
        db.exec_driver_sql("DELETE FROM blobs")

    final = await runner.wait(run.id, poll=0.1)

    assert final.state == "create_failed"
    assert "holds no file contents with sha256" in (final.reason or "")
