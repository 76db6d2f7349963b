"""``jobrunner local``: serve, start, stop and inspect the local Machines backend.

Exit codes: 0 success; 1 failure (message on stderr); 2 bad usage (click); ``status`` exits 3
when no server is running (the LSB convention for "not running").
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from jobrunner.errors import ConfigError
from jobrunner.local.api.errors import ApiError
from jobrunner.local.api.validate import parse_duration
from jobrunner.local.settings import (
    ADMIN_ENV,
    DEFAULT_APP,
    DEFAULT_HOST,
    DEFAULT_PORT,
    ServerSettings,
    base_url,
    default_state_dir,
    faults_from_env,
)

__all__ = ["EXIT_NOT_RUNNING", "local"]

EXIT_NOT_RUNNING = 3

_state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="State directory [default: $JOBRUNNER_HOME/local, i.e. ~/.jobrunner/local].",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def _state_dir(value: Path | None) -> Path:
    return (value or default_state_dir()).expanduser().absolute()


def _emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(data) if as_json else text)


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> timedelta:
    try:
        return timedelta(seconds=parse_duration(value, field=param.name or "duration"))
    except ApiError as exc:
        raise click.BadParameter(exc.message) from None


@click.group("local")
def local() -> None:
    """The local Machines backend: Fly's Machines API, running machines as local processes."""


@local.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="Port (0: any).")
@_state_dir_option
@click.option(
    "--app", "default_app", envvar="FLY_APP", default=DEFAULT_APP, show_default=True,
    help="App created at start (FLY_APP).",
)  # fmt: skip
@click.option(
    "--retention", default="48h", show_default=True, callback=_duration,
    envvar="JOBRUNNER_LOCAL_RETENTION", help="How long destroyed machines stay readable.",
)  # fmt: skip
@click.option(
    "--enable-admin", is_flag=True, envvar=ADMIN_ENV,
    help=f"Serve the test-only /_admin endpoints (faults, clock) [{ADMIN_ENV}=1].",
)  # fmt: skip
@click.option("--fake-clock", is_flag=True, help="Test only: time moves only via /_admin/clock.")
@click.option("--access-log", is_flag=True, help="Log every request.")
@_json_option
def serve(
    host: str,
    port: int,
    state_dir: Path | None,
    default_app: str,
    retention: timedelta,
    enable_admin: bool,
    fake_clock: bool,
    access_log: bool,
    as_json: bool,
) -> None:
    """Serve in the foreground until SIGINT/SIGTERM, then stop the machines cleanly."""
    from jobrunner.local.daemon import ensure_token
    from jobrunner.local.server import configure_logging
    from jobrunner.local.server import serve as run_server

    directory = _state_dir(state_dir)
    try:
        settings = ServerSettings(
            state_dir=directory,
            token=ensure_token(directory),
            host=host,
            port=port,
            default_app=default_app,
            retention=retention,
            admin=enable_admin,
            fake_clock=fake_clock,
            faults=faults_from_env(),
            access_log=access_log,
        )
        configure_logging()

        def announce(ready: ServerSettings) -> None:
            data = {
                "event": "serving",
                "base_url": base_url(ready.host, ready.port),
                "state_dir": str(directory),
                "pid": os.getpid(),
            }
            text = (
                f"serving the local backend at {data['base_url']} (state dir {directory}); "
                "Ctrl-C stops it"
            )
            _emit(as_json, data, text)

        run_server(settings, announce)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@local.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True)
@click.option(
    "--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
    envvar="JOBRUNNER_LOCAL_PORT",
    help="Port (0: any) [env JOBRUNNER_LOCAL_PORT, as `jobrunner run` uses it].",
)  # fmt: skip
@_state_dir_option
@click.option("--timeout", default=15.0, show_default=True, help="Seconds to wait for it.")
@_json_option
def start(host: str, port: int, state_dir: Path | None, timeout: float, as_json: bool) -> None:
    """Start a server in the background (or find the running one) and wait until it answers."""
    from jobrunner.local.daemon import ensure_running

    try:
        endpoint = ensure_running(_state_dir(state_dir), host=host, port=port, timeout=timeout)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    _emit(
        as_json,
        {"running": True, "base_url": endpoint.base_url, "pid": endpoint.pid,
         "state_dir": str(endpoint.state_dir)},
        f"local backend running at {endpoint.base_url} (pid {endpoint.pid}, state dir "
        f"{endpoint.state_dir})",
    )  # fmt: skip


@local.command()
@_state_dir_option
@click.option("--timeout", default=30.0, show_default=True, help="Seconds before SIGKILL.")
@click.option(
    "--stop-machines", is_flag=True,
    help="Also stop every running machine (recording its exit); by default they keep running "
    "and the next server adopts them.",
)  # fmt: skip
@_json_option
def stop(state_dir: Path | None, timeout: float, stop_machines: bool, as_json: bool) -> None:
    """Stop the background API server; running machines go on unless --stop-machines."""
    from jobrunner.local.daemon import stop_server

    directory = _state_dir(state_dir)
    stopped = stop_server(directory, timeout=timeout, stop_machines=stop_machines)
    if not stopped:
        text = f"no local backend was running for {directory}"
    elif stop_machines:
        text = "local backend and its machines stopped"
    else:
        text = "local backend stopped (running machines go on; the next server adopts them)"
    _emit(
        as_json,
        {"stopped": stopped, "stop_machines": stop_machines, "state_dir": str(directory)},
        text,
    )


@local.command()
@_state_dir_option
@_json_option
def status(state_dir: Path | None, as_json: bool) -> None:
    """Say whether a server is running (exit code 3 when it is not)."""
    from jobrunner.local.daemon import server_status

    result = server_status(_state_dir(state_dir))
    if result.running:
        text = f"running at {result.base_url} (pid {result.pid}, state dir {result.state_dir})"
    else:
        text = f"not running (state dir {result.state_dir})"
    _emit(as_json, result.to_json(), text)
    if not result.running:
        raise click.exceptions.Exit(EXIT_NOT_RUNNING)


@local.command()
@_state_dir_option
@_json_option
def token(state_dir: Path | None, as_json: bool) -> None:
    """Print the API token (generated and stored on first use)."""
    from jobrunner.local.daemon import ensure_token

    value = ensure_token(_state_dir(state_dir))
    _emit(as_json, {"token": value}, value)
