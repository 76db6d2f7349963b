"""Starting real local backend servers for tests, and small helpers to talk to them.

Each server is ``python -m jobrunner.local serve --port 0`` in its own process and session, with
a temporary state dir and a known token; its output goes to a file beside the state dir (never
to the test's stdout). ``stop()`` sends SIGTERM and, if it hangs, SIGKILLs its process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

TOKEN = "test-token-0123456789"
APP = "jobrunner-local"
IMAGE = "registry.example/test:1"


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    state_dir: Path
    base_url: str
    log_path: Path
    token: str = TOKEN

    @property
    def pid(self) -> int:
        return self.process.pid

    def headers(self, nonce: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if nonce:
            headers["fly-machine-lease-nonce"] = nonce
        return headers

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers=self.headers(),
            timeout=kwargs.pop("timeout", 30.0),
            trust_env=False,
            **kwargs,
        )

    def machines_url(self, app: str = APP) -> str:
        return f"/v1/apps/{app}/machines"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 25.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


# How the tests start a server: the module behind `jobrunner local`, which starts fastest.
LOCAL_MODULE = ("-m", "jobrunner.local")
# The command a user types, `jobrunner local serve` (it loads the whole CLI first).
JOBRUNNER_LOCAL = ("-m", "jobrunner", "local")


def _server_environment(env: dict[str, str] | None) -> dict[str, str]:
    # Module-scoped servers start before the autouse fixture cleans the environment, so settings
    # from the caller's shell (FLY_APP names the default app, JOBRUNNER_LOCAL_* turn on faults
    # or admin mode) are dropped here; a test that wants one passes it in ``env``.
    inherited = {
        name: value
        for name, value in os.environ.items()
        if name != "FLY_APP" and not name.startswith("JOBRUNNER_LOCAL_")
    }
    return {**inherited, "JOBRUNNER_LOCAL_TOKEN": TOKEN, **(env or {})}


def start_server(
    state_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 20.0,
    command: tuple[str, ...] = LOCAL_MODULE,
) -> ServerProcess:
    """Start a server on a free port and wait until /healthz answers."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir.parent / f"{state_dir.name}-server.log"
    environment = _server_environment(env)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, *command, "serve", "--port", "0",
             "--state-dir", str(state_dir), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=state_dir.parent,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        base_url = _listening_url(state_dir, process.pid)
        if base_url is not None:
            return ServerProcess(process, state_dir, base_url, log_path)
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server did not start in {timeout} s:\n{log_path.read_text()}")


def _listening_url(state_dir: Path, pid: int) -> str | None:
    try:
        info = json.loads((state_dir / "server.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("pid") != pid:
        return None
    try:
        response = httpx.get(f"{info['base_url']}/healthz", timeout=2.0, trust_env=False)
    except httpx.HTTPError:
        return None
    return str(info["base_url"]) if response.status_code == 200 else None


def command_config(*argv: str, **extra: Any) -> dict[str, Any]:
    """A machine config that runs ``argv`` (restart policy "no" unless given)."""
    config: dict[str, Any] = {
        "image": IMAGE,
        "init": {"cmd": list(argv)},
        "restart": {"policy": "no"},
    }
    config.update(extra)
    return config


async def create_machine(
    api: httpx.AsyncClient, config: dict[str, Any], app: str = APP, **body: Any
) -> dict[str, Any]:
    response = await api.post(f"/v1/apps/{app}/machines", json={"config": config, **body})
    assert response.status_code == 200, response.text
    machine: dict[str, Any] = response.json()
    return machine


async def wait_for(
    api: httpx.AsyncClient, machine_id: str, *states: str, timeout: int = 10, app: str = APP,
    **params: str,
) -> httpx.Response:  # fmt: skip
    query: list[tuple[str, str | int | float | bool | None]] = [("state", s) for s in states]
    query.append(("timeout", timeout))
    query.extend(params.items())
    return await api.get(f"/v1/apps/{app}/machines/{machine_id}/wait", params=query)


async def reach(
    api: httpx.AsyncClient, machine_id: str, *states: str, timeout: int = 10, app: str = APP,
    **params: str,
) -> None:  # fmt: skip
    """Wait for one of ``states`` and fail the test with the machine's state if it never comes."""
    response = await wait_for(api, machine_id, *states, timeout=timeout, app=app, **params)
    assert response.status_code == 200, response.text


async def get_machine(api: httpx.AsyncClient, machine_id: str, app: str = APP) -> dict[str, Any]:
    response = await api.get(f"/v1/apps/{app}/machines/{machine_id}")
    assert response.status_code == 200, response.text
    machine: dict[str, Any] = response.json()
    return machine


def exit_events(machine: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["request"]["exit_event"] for e in machine["events"] if e["type"] == "exit"]


def machine_pids(machine_id: str) -> list[int]:
    """Live processes whose environment says they belong to ``machine_id`` (from /proc)."""
    marker = f"FLY_MACHINE_ID={machine_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = process_state(int(entry.name))
        except (OSError, ValueError):
            continue
        if marker in environ.split(b"\0") and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (T: stopped by a signal, Z: zombie)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]
