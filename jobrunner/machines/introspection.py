"""The machine endpoints for looking inside a machine: config versions, processes, and exec.

fly-machines-api.md section 3 lists these next to the lifecycle calls. The runner does not need
them, so they live here rather than in client.py; ``AsyncMachinesClient`` inherits them, and
``MachinesClient`` forwards them like every other method.

* ``GET /{id}/versions`` (swagger only): ``[{"version", "user_config"}]``.
* ``GET /{id}/ps?sort_by=&order=``: ``[ProcessStat]``.
* ``POST /{id}/exec``: swagger takes ``{"command": [...], "timeout"}`` and answers the raw output
  bytes; fly-go sends ``{"cmd": "...", "timeout"}`` and reads JSON ``{exit_code, stdout,
  stderr}``. Both argument forms are sent, and both answer forms are read (section 13).

The jobrunner local backend does not implement these three; there they raise ``NotFound``.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from jobrunner.machines._base import ClientBase
from jobrunner.machines._requests import Params, machines_path, parse_model, parse_models
from jobrunner.machines.models import FlyModel, MachineConfig

__all__ = ["ExecResult", "MachineIntrospection", "MachineVersion", "ProcessStat"]

# An exec answers only when the command is done: give the read this much beyond its timeout.
_EXEC_READ_MARGIN = 15.0


class MachineVersion(FlyModel):
    """One version of a machine's config (``instance_id``-like ``version`` and its config)."""

    version: str | None = None
    user_config: MachineConfig | None = None


class ProcessStat(FlyModel):
    """One process inside a machine, as ``ps`` reports it."""

    pid: int | None = None
    command: str | None = None
    directory: str | None = None
    cpu: int | None = None
    rss: int | None = None
    rtime: int | None = None
    stime: int | None = None
    listen_sockets: list[dict[str, Any]] | None = None


class ExecResult(FlyModel):
    """What a command run with ``exec`` produced.

    ``exit_code`` is None when the API answered with the raw output only (the older form),
    which then is all in ``stdout``.
    """

    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""


class MachineIntrospection(ClientBase):
    """The versions, ps and exec endpoints (a base of ``AsyncMachinesClient``)."""

    async def list_versions(
        self, machine_id: str, *, app: str | None = None
    ) -> list[MachineVersion]:
        """The machine's config versions."""
        app = self._app(app)
        data = await self._json(
            "GET",
            machines_path(app, machine_id, "versions"),
            what="list versions",
            action="versions",
            scope=machine_id,
        )
        return parse_models(data, MachineVersion, what="list versions")

    async def list_processes(
        self,
        machine_id: str,
        *,
        sort_by: str | None = None,
        order: str | None = None,
        app: str | None = None,
    ) -> list[ProcessStat]:
        """The processes running in the machine, optionally sorted (e.g. ``sort_by="cpu"``)."""
        app = self._app(app)
        params: Params = []
        if sort_by is not None:
            params.append(("sort_by", sort_by))
        if order is not None:
            params.append(("order", order))
        data = await self._json(
            "GET",
            machines_path(app, machine_id, "ps"),
            what="list processes",
            action="ps",
            scope=machine_id,
            params=params,
        )
        return parse_models(data, ProcessStat, what="list processes")

    async def exec_machine(
        self,
        machine_id: str,
        command: Sequence[str],
        *,
        timeout: int | None = None,
        app: str | None = None,
    ) -> ExecResult:
        """Run ``command`` (an argument list) in the running machine and return its output.

        ``timeout`` is whole seconds. Not retried on ambiguous failures: the command may have
        run.
        """
        app = self._app(app)
        argv = _argv(command)
        body: dict[str, Any] = {"command": argv, "cmd": shlex.join(argv)}
        read_timeout: httpx.Timeout | None = None
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
                raise ValueError(f"exec timeout must be whole seconds >= 1, got {timeout!r}")
            body["timeout"] = timeout
            read_timeout = httpx.Timeout(self._timeout, read=timeout + _EXEC_READ_MARGIN)
        what = f"exec in machine {machine_id}"
        response = await self._request(
            "POST",
            machines_path(app, machine_id, "exec"),
            action="exec",
            scope=machine_id,
            idempotent=False,
            json=body,
            timeout=read_timeout,
        )
        data = _json_object(response)
        if data is not None:
            return parse_model(data, ExecResult, what=what)
        return ExecResult(stdout=response.content.decode("utf-8", "replace"))


def _argv(command: Sequence[str]) -> list[str]:
    # A str is a Sequence[str] too; sending it would run one argument per character.
    if isinstance(command, str):
        raise ValueError(
            f"exec command must be a list of arguments such as {command.split()!r}, not one string"
        )
    argv = [str(arg) for arg in command]
    if not argv:
        raise ValueError("exec command must not be empty, e.g. ['ls', '-la']")
    return argv


def _json_object(response: httpx.Response) -> Mapping[str, Any] | None:
    """The answer as a JSON object when it says it is JSON, else None (raw output)."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return None
    try:
        data = json.loads(response.content)
    except ValueError:
        return None
    return data if isinstance(data, Mapping) else None
