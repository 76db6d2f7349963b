"""Who drives a run: claim owners, whether an owner is still alive, and ``RunBusy``.

A run is driven by one process at a time. The driver holds a claim in the ledger (an owner id and
an expiry it renews); a claim whose owner is a dead process on this host, or whose expiry passed,
may be taken over by anyone who wants to finish the run.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import UTC, datetime

from jobrunner.errors import JobrunnerError

__all__ = ["CLAIM_TTL", "RunBusy", "new_owner_id", "owner_is_alive"]

CLAIM_TTL = 30.0


class RunBusy(JobrunnerError):
    """Another live process is driving this run."""

    def __init__(self, run_id: str, owner: str) -> None:
        super().__init__(f"run {run_id} is being driven by another process ({owner})")
        self.run_id = run_id
        self.owner = owner


def new_owner_id() -> str:
    """``host:pid:random``: unique per runner, and checkable for liveness on this host."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_alive(owner: str | None, expires_at: datetime | None) -> bool:
    """Whether a claim still belongs to a live process."""
    if not owner:
        return False
    now = datetime.now(UTC)
    if expires_at is not None and expires_at < now:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host == socket.gethostname() and pid_text.isdigit():
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True
