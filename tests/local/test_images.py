"""Creates with only ``image``: the image's command from the local catalog, or a clear failure."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from jobrunner.local.fleet.images import (
    IMAGES_ENV,
    NO_COMMAND_EXIT_CODE,
    ImageCatalog,
    resolve_command,
)

from .local_harness import APP, ServerProcess, create_machine, exit_events, get_machine, reach


def resolve(image: str, *init: list[str] | None, state_dir: Path | None = None,
            environ: dict[str, str] | None = None) -> tuple[list[str], str | None]:  # fmt: skip
    exec_, entrypoint, cmd = [*init, None, None, None][:3]
    return resolve_command(
        image, exec_, entrypoint, cmd, state_dir=state_dir, environ=environ or {},
        catalog=ImageCatalog(),
    )  # fmt: skip


def test_the_argv_follows_fly_init_rules_over_the_catalog() -> None:
    assert resolve("python:3.12-slim") == (["python3"], None)
    assert resolve("docker.io/library/python:3") == (["python3"], None)
    assert resolve("alpine") == (["/bin/sh"], None)
    assert resolve("ubuntu:24.04") == (["bash"], None)
    assert resolve("python:3", ["/bin/run"], ["ep"], ["c"]) == (["/bin/run"], None)
    assert resolve("python:3", None, None, ["main.py"]) == (["main.py"], None)
    # A custom entrypoint drops the image's CMD, as Docker does.
    assert resolve("python:3", None, ["python3", "-u"]) == (["python3", "-u"], None)
    assert resolve("unknown/image:1", None, None, ["echo", "hi"]) == (["echo", "hi"], None)


def test_an_unknown_image_without_a_command_gets_a_failing_argv_that_explains(
    tmp_path: Path,
) -> None:
    argv, explanation = resolve("registry.example/team/app:1", state_dir=tmp_path)
    assert explanation is not None
    assert "registry.example/team/app:1" in explanation and "init.cmd" in explanation
    assert str(tmp_path / "images.toml") in explanation
    assert argv[:2] == ["/bin/sh", "-c"] and argv[-1] == explanation
    assert f"exit {NO_COMMAND_EXIT_CODE}" in argv[2]


def test_users_extend_and_override_the_catalog(tmp_path: Path) -> None:
    (tmp_path / "images.toml").write_text(
        '[images."registry.example/team/*"]\ncmd = ["run-team-app"]\n'
        '[images."python:*"]\nentrypoint = ["/opt/py"]\ncmd = ["-i"]\n'
    )
    assert resolve("registry.example/team/app:1", state_dir=tmp_path) == (["run-team-app"], None)
    assert resolve("python:3.12", state_dir=tmp_path) == (["/opt/py", "-i"], None)
    # The image's entrypoint stays when only init.cmd is given.
    assert resolve("python:3", None, None, ["x"], state_dir=tmp_path) == (["/opt/py", "x"], None)

    named = tmp_path / "catalog.json"
    named.write_text(json.dumps({"images": {"custom": {"cmd": ["custom-cmd"]}}}))
    environ = {IMAGES_ENV: str(named)}
    assert resolve("custom:latest", state_dir=tmp_path, environ=environ) == (["custom-cmd"], None)
    # The variable replaces the state dir's file.
    assert resolve("registry.example/team/app:1", state_dir=tmp_path, environ=environ)[1]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not toml [", "cannot read"),
        ('[images."x"]\ncmd = "a string"\n', "list of strings"),
        ('[images."x"]\nshell = ["sh"]\n', "only entrypoint and cmd"),
        ("images = 3\n", '"images" table'),
    ],
)
def test_a_broken_catalog_file_is_reported(tmp_path: Path, content: str, problem: str) -> None:
    (tmp_path / "images.toml").write_text(content)
    with pytest.raises(ValueError, match=problem):
        resolve("x", state_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve("x", environ={IMAGES_ENV: str(tmp_path / "missing.toml")})


async def logs_of(api: httpx.AsyncClient, machine_id: str) -> list[str]:
    page = await api.get(f"/api/v1/apps/{APP}/logs", params={"instance": machine_id})
    return [entry["attributes"]["message"] for entry in page.json()["data"]]


def event_trail(machine: dict[str, object]) -> list[tuple[str, str]]:
    events = machine["events"]
    assert isinstance(events, list)
    return [(e["type"], e["status"]) for e in reversed(events)]


async def test_an_image_only_create_runs_the_images_command(
    server: ServerProcess, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    # python:* runs the `python3` on the machine's PATH: put a stand-in first on that PATH.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text('#!/bin/sh\necho "python3 from the catalog, args: $#"\n')
    fake.chmod(0o755)
    config = {
        "image": "python:3.12-slim",
        "env": {"PATH": f"{bin_dir}:/usr/bin:/bin"},
        "restart": {"policy": "no"},
    }
    machine = await create_machine(api, config)
    assert machine["state"] == "created" and "init" not in machine["config"]
    await reach(api, machine["id"], "stopped", timeout=30)
    finished = await get_machine(api, machine["id"])
    assert exit_events(finished)[0]["exit_code"] == 0
    assert await logs_of(api, machine["id"]) == ["python3 from the catalog, args: 0"]

    # The state dir's images.toml extends the catalog, read at each boot.
    (server.state_dir / "images.toml").write_text(
        '[images."registry.example/hello:*"]\ncmd = ["echo", "hello from images.toml"]\n'
    )
    try:
        hello = await create_machine(
            api, {"image": "registry.example/hello:2", "restart": {"policy": "no"}}
        )
        await reach(api, hello["id"], "stopped", timeout=30)
        assert await logs_of(api, hello["id"]) == ["hello from images.toml"]
    finally:
        (server.state_dir / "images.toml").unlink()


async def test_an_unknown_image_starts_then_fails_saying_what_to_configure(
    api: httpx.AsyncClient,
) -> None:
    image = "registry.example/unknown:7"
    machine = await create_machine(api, {"image": image, "restart": {"policy": "no"}})
    await reach(api, machine["id"], "stopped", timeout=30)
    finished = await get_machine(api, machine["id"])
    assert event_trail(finished) == [
        ("launch", "created"),
        ("start", "started"),
        ("exit", "stopped"),
    ]
    exit_event = exit_events(finished)[0]
    assert exit_event["exit_code"] == NO_COMMAND_EXIT_CODE
    assert exit_event["requested_stop"] is False
    lines = await logs_of(api, machine["id"])
    assert len(lines) == 1 and lines[0].startswith("no command to run")
    assert image in lines[0] and "init.cmd" in lines[0] and "images.toml" in lines[0]
    page = await api.get(f"/api/v1/apps/{APP}/logs", params={"instance": machine["id"]})
    assert page.json()["data"][0]["attributes"]["level"] == "error"
