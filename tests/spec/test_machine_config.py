"""From a Job to the Machines API config of one attempt."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from jobrunner.spec import Job, JobSpecError


def test_machine_config_carries_everything_fly_needs(tmp_path: Path) -> None:
    (tmp_path / "payload.bin").write_bytes(b"\x00\x01binary\xff")
    job = Job.parse(
        {
            "name": "full",
            "image": "registry.fly.io/app:v1",
            "entrypoint": ["/bin/sh", "-c"],
            "cmd": ["echo $GREETING"],
            "env": {"GREETING": "hi"},
            "secrets": ["API_TOKEN"],
            "files": [
                {"guest_path": "/etc/app.json", "content": '{"a": 1}', "mode": "0600"},
                {"guest_path": "/data/payload.bin", "source": "payload.bin"},
                {"guest_path": "/etc/cert.pem", "secret_name": "TLS_CERT_B64"},
            ],
            "guest": {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096},
            "stop_signal": "SIGTERM",
            "stop_timeout": "30s",
            "metadata": {"team": "data"},
        },
        source_path=tmp_path / "full.toml",
    )

    config = job.to_machine_config(
        environ={"API_TOKEN": "tok-xyz", "UNRELATED": "no"},
        metadata={"jobrunner_run_id": "01ABC", "jobrunner_attempt": "1"},
    ).to_api()

    assert config["image"] == "registry.fly.io/app:v1"
    assert config["init"] == {"entrypoint": ["/bin/sh", "-c"], "cmd": ["echo $GREETING"]}
    assert config["env"] == {"GREETING": "hi", "API_TOKEN": "tok-xyz"}
    assert config["files"] == [
        {
            "guest_path": "/etc/app.json",
            "raw_value": base64.b64encode(b'{"a": 1}').decode(),
            "mode": 0o600,
        },
        {
            "guest_path": "/data/payload.bin",
            "raw_value": base64.b64encode(b"\x00\x01binary\xff").decode(),
        },
        {"guest_path": "/etc/cert.pem", "secret_name": "TLS_CERT_B64"},
    ]
    assert config["guest"] == {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096}
    assert config["auto_destroy"] is True
    assert config["restart"] == {"policy": "no"}
    assert config["stop_config"] == {"signal": "SIGTERM", "timeout": "30s"}
    assert config["metadata"] == {
        "team": "data",
        "jobrunner_run_id": "01ABC",
        "jobrunner_attempt": "1",
    }


def test_defaults_in_the_machine_config() -> None:
    job = Job(name="x", image="python:3.12-slim", exec=["python3", "/app/main.py"])
    config = job.to_machine_config(environ={}, metadata={}).to_api()
    assert config["init"] == {"exec": ["python3", "/app/main.py"]}
    assert config["guest"] == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}
    assert config["stop_config"] == {"signal": "SIGINT", "timeout": "10s"}
    assert "files" not in config


def test_a_missing_secret_names_only_the_variable() -> None:
    job = Job(name="x", image="i", cmd=["true"], secrets=["PRESENT", "ABSENT"])
    with pytest.raises(JobSpecError) as caught:
        job.to_machine_config(environ={"PRESENT": "very-secret-value"}, metadata={})
    assert [(p.key, p.value) for p in caught.value.problems] == [("secrets[1]", "ABSENT")]
    assert "very-secret-value" not in str(caught.value)
    assert "very-secret-value" not in repr(caught.value.problems)
