"""Building a Job in Python: defaults, normalisation, sizes, and the same validation as files."""

from __future__ import annotations

from typing import Any

import pytest

from jobrunner.spec import Job, JobSpecError


def _job(**overrides: Any) -> Job:
    values: dict[str, Any] = {"name": "x", "image": "python:3.12", "cmd": ["python", "-c", "1"]}
    values.update(overrides)
    return Job(**values)


def _keys(error: JobSpecError) -> list[str]:
    return [p.key for p in error.problems]


def test_minimal_job_and_its_defaults() -> None:
    job = Job(name="x", image="python:3.12", cmd=["python", "-c", "print(1)"])

    assert job.cmd == ["python", "-c", "print(1)"]
    assert job.timeout is None and job.region is None and job.fallback_regions == []
    assert (job.stop_signal, job.stop_timeout) == ("SIGINT", 10.0)
    assert job.retries.max_attempts == 1
    assert job.source_path is None
    guest = job.guest_resolved()
    assert (guest.cpu_kind, guest.cpus, guest.memory_mb) == ("shared", 1, 256)


def test_command_strings_are_split_like_a_shell() -> None:
    job = _job(cmd="python3 -c 'print(\"hi there\")'", entrypoint="/bin/sh -c")
    assert job.cmd == ["python3", "-c", 'print("hi there")']
    assert job.entrypoint == ["/bin/sh", "-c"]


def test_init_holds_exec_or_entrypoint_and_cmd() -> None:
    job = _job(cmd=None, exec=["/app/run", "--fast"])
    assert job.init().to_api() == {"exec": ["/app/run", "--fast"]}
    both = _job(entrypoint=["/bin/sh", "-c"], cmd=["echo hi"])
    assert both.init().to_api() == {"entrypoint": ["/bin/sh", "-c"], "cmd": ["echo hi"]}


def test_exec_with_cmd_or_entrypoint_is_refused_as_it_would_be_ignored() -> None:
    with pytest.raises(JobSpecError) as caught:
        _job(exec=["/app/run"], entrypoint=["/bin/sh"])
    assert _keys(caught.value) == ["entrypoint", "cmd"]


def test_durations_in_seconds() -> None:
    job = _job(timeout="1h30m", stop_timeout="30s")
    assert (job.timeout, job.stop_timeout) == (5400.0, 30.0)
    assert _job(timeout=45).timeout == 45.0


def test_stop_signal_is_normalised() -> None:
    assert _job(stop_signal="term").stop_signal == "SIGTERM"
    assert _job(stop_signal="SIGUSR1").stop_signal == "SIGUSR1"


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("shared-cpu-2x", ("shared", 2, 512, None, None)),
        ("performance-4x", ("performance", 4, 8192, None, None)),
        ("a100-40gb", ("performance", 8, 32768, "a100-pcie-40gb", 1)),
        ("l40s", ("performance", 8, 32768, "l40s", 1)),
    ],
)
def test_size_presets(size: str, expected: tuple[object, ...]) -> None:
    guest = _job(size=size).guest_resolved()
    assert (guest.cpu_kind, guest.cpus, guest.memory_mb, guest.gpu_kind, guest.gpus) == expected


def test_partial_guest_tables_get_the_smallest_allowed_memory() -> None:
    assert _job(guest={"cpus": 2}).guest_resolved().memory_mb == 512
    perf = _job(guest={"cpu_kind": "performance", "cpus": 2}).guest_resolved()
    assert perf.memory_mb == 4096
    explicit = _job(guest={"cpus": 2, "memory_mb": 4096}).guest_resolved()
    assert (explicit.cpu_kind, explicit.cpus, explicit.memory_mb) == ("shared", 2, 4096)


@pytest.mark.parametrize(
    ("guest", "ok"),
    [
        ({"cpus": 1, "memory_mb": 2048}, True),
        ({"cpus": 1, "memory_mb": 2304}, False),  # above 2048 per shared CPU
        ({"cpus": 1, "memory_mb": 300}, False),  # not a multiple of 256
        ({"cpu_kind": "performance", "cpus": 1, "memory_mb": 1024}, False),  # below 2048
        ({"cpu_kind": "performance", "cpus": 2, "memory_mb": 16384}, True),
        ({"cpu_kind": "performance", "cpus": 2, "memory_mb": 16640}, False),  # above 8192 each
    ],
)
def test_memory_limits_per_cpu_kind(guest: dict[str, Any], ok: bool) -> None:
    if ok:
        _job(guest=guest)
        return
    with pytest.raises(JobSpecError) as caught:
        _job(guest=guest)
    assert _keys(caught.value) == ["guest.memory_mb"]
    assert "memory_mb = " in caught.value.problems[0].fix


def test_gpu_needs_performance_cpus_and_a_kind() -> None:
    with pytest.raises(JobSpecError) as caught:
        _job(guest={"cpu_kind": "shared", "gpu_kind": "a10"})
    assert _keys(caught.value) == ["guest.cpu_kind"]
    with pytest.raises(JobSpecError) as caught:
        _job(guest={"gpus": 1})
    assert _keys(caught.value) == ["guest.gpus"]


def test_python_construction_raises_job_spec_error_with_every_problem() -> None:
    with pytest.raises(JobSpecError) as caught:
        Job(name="has space", image="python:3.12", timeout="soon", files=[{"guest_path": "x"}])
    assert set(_keys(caught.value)) == {"name", "timeout", "files[0].guest_path"}
    assert all(p.file is None for p in caught.value.problems)


def test_metadata_keys_starting_with_jobrunner_are_reserved() -> None:
    with pytest.raises(JobSpecError) as caught:
        _job(metadata={"team": "data", "jobrunner_run_id": "forged"})
    assert _keys(caught.value) == ["metadata.jobrunner_run_id"]
    assert "reserved" in caught.value.problems[0].message


def test_env_and_secret_names_must_be_variable_names() -> None:
    with pytest.raises(JobSpecError) as caught:
        _job(env={"GOOD": "1", "not ok": "2"}, secrets=["TOKEN", "9LIVES"])
    assert sorted(_keys(caught.value)) == ["env.not ok", "secrets[1]"]


def test_a_secret_cannot_also_be_plain_env() -> None:
    with pytest.raises(JobSpecError) as caught:
        _job(env={"TOKEN": "plain"}, secrets=["TOKEN"])
    assert _keys(caught.value) == ["secrets[0]"]
    assert "remove TOKEN from [env]" in caught.value.problems[0].fix


def test_file_modes_as_octal_strings_or_numbers() -> None:
    job = _job(
        files=[
            {"guest_path": "/a", "content": "x", "mode": "0600"},
            {"guest_path": "/b", "content": "x", "mode": 384},
            {"guest_path": "/c", "content": "x", "mode": "755"},
        ]
    )
    assert [f.mode for f in job.files] == [0o600, 0o600, 0o755]
    with pytest.raises(JobSpecError) as caught:
        _job(files=[{"guest_path": "/a", "content": "x", "mode": "rw-r--r--"}])
    assert _keys(caught.value) == ["files[0].mode"]


def test_jobs_are_immutable() -> None:
    job = _job()
    with pytest.raises(Exception, match="frozen"):
        job.image = "other"  # type: ignore[misc]
