"""jobrunner: run batch jobs as ephemeral Fly Machines, with a durable run ledger."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
