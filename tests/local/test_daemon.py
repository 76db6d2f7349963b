"""Background servers: ensure_running, the token, and `jobrunner local start|stop|status|token`."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from jobrunner.cli import main
from jobrunner.errors import ConfigError
from jobrunner.local import LocalEndpoint, ensure_running, read_token
from jobrunner.local.cli import local
from jobrunner.local.daemon import ensure_token, server_status, stop_server

from .local_harness import command_config, machine_pids, start_server
from .shim_helpers import end_shim, eventually, shim_pids


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "local-state"
    try:
        yield directory
    finally:
        stop_server(directory, timeout=10, stop_machines=True)
        assert end_shim(directory)


def test_ensure_running_starts_once_and_then_reuses(state_dir: Path) -> None:
    port = _free_port()
    endpoint = ensure_running(state_dir, port=port)
    assert isinstance(endpoint, LocalEndpoint)
    assert endpoint.base_url == f"http://127.0.0.1:{port}"
    assert endpoint.token not in repr(endpoint)
    token_file = state_dir / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    # the state dir holds machine configs (job secrets in env) and output: owner only
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert read_token(state_dir) == endpoint.token == token_file.read_text().strip()
    answer = httpx.get(
        f"{endpoint.base_url}/v1/apps",
        headers={"Authorization": f"Bearer {endpoint.token}"},
        trust_env=False,
    )
    assert answer.status_code == 200
    again = ensure_running(state_dir, port=_free_port())  # found via server.json: same server
    assert (again.base_url, again.pid) == (endpoint.base_url, endpoint.pid)
    assert (state_dir / "server.log").exists()
    assert server_status(state_dir).running
    assert stop_server(state_dir) is True
    assert not server_status(state_dir).running
    assert stop_server(state_dir) is False


def test_default_state_dir_is_under_jobrunner_home(isolated_environment: Path) -> None:
    home_state = isolated_environment / "local"
    try:
        endpoint = ensure_running(port=_free_port())
        assert endpoint.state_dir == home_state.absolute()
        assert (home_state / "server.json").exists()
    finally:
        stop_server(home_state, timeout=10)


def test_a_port_used_by_another_program_is_named(state_dir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use"):
            ensure_running(state_dir, port=port)


def test_a_port_used_by_another_local_server_is_named(state_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    other = tmp_path / "other-state"
    try:
        ensure_running(other, port=port)
        with pytest.raises(ConfigError, match="another jobrunner local backend"):
            ensure_running(state_dir, port=port)
    finally:
        stop_server(other, timeout=10)


def test_a_server_that_cannot_start_says_why(state_dir: Path) -> None:
    with pytest.raises(ConfigError, match="exited with code") as failure:
        ensure_running(state_dir, host="203.0.113.7", port=_free_port(), timeout=15)
    assert "cannot listen" in str(failure.value)


def test_the_token_comes_from_the_environment_when_set(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBRUNNER_LOCAL_TOKEN", "from-env-123")
    assert ensure_token(state_dir) == "from-env-123"
    assert not (state_dir / "token").exists()  # a given token is not written to disk
    endpoint = ensure_running(state_dir, port=_free_port())
    assert endpoint.token == "from-env-123"
    anonymous = httpx.get(f"{endpoint.base_url}/v1/apps", trust_env=False)
    assert anonymous.status_code == 401


def test_read_token_without_one_explains(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="jobrunner local start"):
        read_token(tmp_path / "empty")


def test_cli_start_status_token_stop(state_dir: Path) -> None:
    runner = CliRunner()
    args = ["--state-dir", str(state_dir)]
    not_running = runner.invoke(local, ["status", *args, "--json"])
    assert not_running.exit_code == 3
    assert json.loads(not_running.output)["running"] is False

    started = runner.invoke(local, ["start", *args, "--port", str(_free_port()), "--json"])
    assert started.exit_code == 0, started.output
    info = json.loads(started.output)
    assert info["running"] is True and info["base_url"].startswith("http://127.0.0.1:")

    status = runner.invoke(local, ["status", *args])
    assert status.exit_code == 0 and f"running at {info['base_url']}" in status.output

    token = runner.invoke(local, ["token", *args])
    assert token.exit_code == 0 and token.output.strip() == read_token(state_dir)

    stopped = runner.invoke(local, ["stop", *args, "--json"])
    assert stopped.exit_code == 0 and json.loads(stopped.output)["stopped"] is True
    assert not os.path.exists(state_dir / "server.json")
    again = runner.invoke(local, ["stop", *args])
    assert again.exit_code == 0 and "no local backend was running" in again.output


def test_the_local_group_is_part_of_the_jobrunner_cli(state_dir: Path) -> None:
    result = CliRunner().invoke(main, ["local", "token", "--state-dir", str(state_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == read_token(state_dir)


def test_fly_app_names_the_default_app(tmp_path: Path) -> None:
    process = start_server(tmp_path / "state", env={"FLY_APP": "from-fly-app"})
    try:
        with httpx.Client(
            base_url=process.base_url, headers=process.headers(), trust_env=False
        ) as api:
            assert api.get("/v1/apps/from-fly-app").status_code == 200
            machines = api.get("/v1/apps/from-fly-app/machines")
            assert machines.status_code == 200 and machines.json() == []
            # jobrunner-local is only the default when FLY_APP is not set
            assert api.get("/v1/apps/jobrunner-local").status_code == 404
    finally:
        process.stop()


def test_cli_errors_exit_1_with_a_message(state_dir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = CliRunner().invoke(
            local, ["start", "--state-dir", str(state_dir), "--port", str(port)]
        )
    assert result.exit_code == 1
    assert "is in use by another program" in result.output


def test_cli_serve_rejects_a_bad_retention(state_dir: Path) -> None:
    result = CliRunner().invoke(
        local, ["serve", "--state-dir", str(state_dir), "--retention", "forever"]
    )
    assert result.exit_code == 2 and "retention" in result.output


def test_cli_stop_leaves_machines_running_and_stop_machines_ends_them(state_dir: Path) -> None:
    runner = CliRunner()
    args = ["--state-dir", str(state_dir)]
    started = runner.invoke(local, ["start", *args, "--port", str(_free_port()), "--json"])
    assert started.exit_code == 0, started.output
    endpoint = ensure_running(state_dir)
    headers = {"Authorization": f"Bearer {endpoint.token}"}
    with httpx.Client(base_url=endpoint.base_url, headers=headers, trust_env=False) as api:
        body = {"config": command_config("sleep", "600")}
        machine = api.post("/v1/apps/jobrunner-local/machines", json=body).json()
        wait = api.get(
            f"/v1/apps/jobrunner-local/machines/{machine['id']}/wait",
            params={"state": "started", "timeout": 30},
            timeout=40,
        )
        assert wait.status_code == 200, wait.text
    assert eventually(lambda: bool(machine_pids(machine["id"])))
    pids = machine_pids(machine["id"])

    stopped = runner.invoke(local, ["stop", *args, "--json"])
    assert stopped.exit_code == 0, stopped.output
    assert json.loads(stopped.output) == {
        "stopped": True, "stop_machines": False, "state_dir": str(state_dir),
    }  # fmt: skip
    assert machine_pids(machine["id"]) == pids and shim_pids(state_dir)

    again = ensure_running(state_dir, port=_free_port())
    with httpx.Client(base_url=again.base_url, headers=headers, trust_env=False) as api:
        adopted = api.get(f"/v1/apps/jobrunner-local/machines/{machine['id']}").json()
        assert adopted["state"] == "started"
    ended = runner.invoke(local, ["stop", *args, "--stop-machines"])
    assert ended.exit_code == 0 and "machines stopped" in ended.output
    assert not machine_pids(machine["id"]) and not shim_pids(state_dir)
