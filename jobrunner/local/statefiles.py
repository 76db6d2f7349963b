"""The files of a state directory (``$JOBRUNNER_HOME/local`` by default).

local.db       SQLite (WAL): apps, machines, events, log lines
server.json    pid, host, port and base_url of the running server (removed when it stops)
server.lock    flock-ed by the running server, so two servers never share local.db
server.log     output of a server started in the background
token          the API token, mode 0600 (unless JOBRUNNER_LOCAL_TOKEN is set)
machines/<id>/ each machine's working directory (removed when it is destroyed)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "DB_FILE",
    "INFO_FILE",
    "LOCK_FILE",
    "LOG_FILE",
    "SERVICE_NAME",
    "TOKEN_FILE",
    "make_state_dir",
    "read_server_info",
]

DB_FILE = "local.db"
INFO_FILE = "server.json"
LOCK_FILE = "server.lock"
LOG_FILE = "server.log"
TOKEN_FILE = "token"
# What /healthz calls the service, so a client can tell our server from another program.
SERVICE_NAME = "jobrunner-local"


def make_state_dir(state_dir: Path) -> None:
    """Create ``state_dir`` if needed, readable by its owner only when this call creates it.

    It holds the token, the machines' configs (their ``env`` carries job secrets) and their
    output. An existing directory keeps its mode: it may be one the user chose and shares.
    """
    if not state_dir.parent.exists():
        # JOBRUNNER_HOME made by us (the ledger lives there too): its owner's only.
        state_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    state_dir.mkdir(mode=0o700, exist_ok=True)


def read_server_info(state_dir: Path) -> dict[str, Any] | None:
    """What ``server.json`` says about the server using ``state_dir`` (None when absent/garbled)."""
    try:
        data = json.loads((state_dir / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
