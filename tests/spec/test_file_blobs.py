"""Large files in snapshots: referred to by sha256 and size, their bytes carried beside the JSON
for the ledger's blob store, and needed back (``blobs=``) to build the machine config."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from jobrunner.spec import Job, JobSpecError
from jobrunner.spec.files import INLINE_MAX_BYTES, BlobMissing


def job_with(tmp_path: Path, data: bytes, text: str) -> Job:
    (tmp_path / "data.bin").write_bytes(data)
    return Job.parse(
        {
            "name": "j",
            "image": "alpine",
            "cmd": ["true"],
            "files": [
                {"guest_path": "/srv/data.bin", "source": "data.bin", "mode": "0600"},
                {"guest_path": "/etc/text", "content": text},
                {"guest_path": "/etc/cert.pem", "secret_name": "TLS_CERT"},
            ],
        },
        source_path=tmp_path / "j.toml",
    )


def test_large_files_are_referred_to_by_digest_and_carried_beside(tmp_path: Path) -> None:
    data = bytes(range(256)) * 100  # 25,600 bytes
    text = "é" * INLINE_MAX_BYTES  # twice the limit in UTF-8
    job = job_with(tmp_path, data, text)
    snapshot = job.snapshot()
    source, content, secret = snapshot["files"]
    data_digest = hashlib.sha256(data).hexdigest()
    text_digest = hashlib.sha256(text.encode()).hexdigest()
    assert source == {
        "guest_path": "/srv/data.bin",
        "source": "data.bin",
        "mode": 0o600,
        "sha256": data_digest,
        "size": len(data),
    }
    assert content == {"guest_path": "/etc/text", "sha256": text_digest, "size": 2 * len(text)}
    assert secret == {"guest_path": "/etc/cert.pem", "secret_name": "TLS_CERT"}
    assert {d: load() for d, load in snapshot.blobs.items()} == {
        data_digest: data,
        text_digest: text.encode(),
    }
    assert len(json.dumps(snapshot)) < 1_000

    rebuilt = Job.from_snapshot(json.loads(json.dumps(snapshot)))
    assert rebuilt.blob_digests() == [data_digest, text_digest]
    with pytest.raises(BlobMissing, match=r"/srv/data\.bin"):
        rebuilt.to_machine_config(environ={}, metadata={})
    blobs = {data_digest: data, text_digest: text.encode()}
    config = rebuilt.to_machine_config(environ={}, metadata={}, blobs=blobs)
    assert config == job.to_machine_config(environ={}, metadata={})
    assert [base64.b64decode(f.raw_value or "") for f in config.files or []][:2] == [
        data,
        text.encode(),
    ]
    # A rebuilt job's snapshot refers to the same blobs, which it no longer carries.
    again = rebuilt.snapshot()
    assert dict(again) == dict(snapshot) and again.blobs == {}


def test_small_files_stay_inline(tmp_path: Path) -> None:
    job = job_with(tmp_path, b"\x00small", "hello")
    snapshot = job.snapshot()
    assert snapshot["files"][0]["raw_value"] == base64.b64encode(b"\x00small").decode()
    assert snapshot["files"][1] == {"guest_path": "/etc/text", "content": "hello"}
    assert snapshot.blobs == {}
    assert Job.from_snapshot(json.loads(json.dumps(snapshot))) == job


def test_with_overrides_keeps_the_bytes(tmp_path: Path) -> None:
    job = job_with(tmp_path, b"x" * 50_000, "y" * 50_000)
    changed = job.with_overrides(env={"A": "1"})
    assert changed.blob_digests() == [] and changed.files[0].data == b"x" * 50_000
    assert set(changed.snapshot().blobs) == set(job.snapshot().blobs)


@pytest.mark.parametrize("key", ["sha256", "size", "raw_value"])
def test_a_job_file_cannot_set_jobrunners_own_keys(key: str) -> None:
    value = {"sha256": "0" * 64, "size": 3, "raw_value": "eHl6"}[key]
    with pytest.raises(JobSpecError, match="set by jobrunner itself"):
        Job.parse(
            {
                "name": "j",
                "image": "alpine",
                "cmd": ["true"],
                "files": [{"guest_path": "/etc/x", "content": "xyz", key: value}],
            }
        )
