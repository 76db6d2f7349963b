"""The local Machines backend: Fly's Machines API, served on this computer.

It runs each machine as a local process and answers with the same paths, bodies, status codes,
states and events as Fly (fly-machines-api.md), so the jobrunner client cannot tell it from Fly.
It is the default backend when no Fly token is configured. It imports nothing from the runner,
store or scheduler; it shares only the API models with ``jobrunner.machines``.

Library entry points: ``ensure_running()`` (find or start a background server) and
``read_token()``; the CLI is ``jobrunner local ...`` (``jobrunner.local.cli.local``).
"""

from __future__ import annotations

from jobrunner.local.daemon import LocalEndpoint, ensure_running, read_token

__all__ = ["LocalEndpoint", "ensure_running", "read_token"]
