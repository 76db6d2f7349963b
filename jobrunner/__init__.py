"""jobrunner: run batch jobs as ephemeral Fly Machines, with a durable run ledger.

    from jobrunner import Job, JobRunner

    with JobRunner() as jr:
        run = jr.run(Job(name="hi", image="python:3.12-slim", cmd=["python3", "-c", "print(1)"]))

The names below are imported on first use, so ``import jobrunner`` (and the CLI's ``--version``)
stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "AsyncJobRunner": "jobrunner.api",
    "AsyncRunHandle": "jobrunner.handles",
    "Job": "jobrunner.spec",
    "JobRunner": "jobrunner.api",
    "JobSpecError": "jobrunner.spec",
    "JobrunnerError": "jobrunner.errors",
    "QueueOptions": "jobrunner.queue",
    "RetryPolicy": "jobrunner.spec",
    "Run": "jobrunner.store",
    "RunHandle": "jobrunner.handles",
    "RunResult": "jobrunner.handles",
    "RunState": "jobrunner.states",
    "RunnerClosed": "jobrunner.handles",
    "as_completed": "jobrunner.handles",
    "load_job": "jobrunner.spec",
}

__all__ = [
    "AsyncJobRunner",
    "AsyncRunHandle",
    "Job",
    "JobRunner",
    "JobSpecError",
    "JobrunnerError",
    "QueueOptions",
    "RetryPolicy",
    "Run",
    "RunHandle",
    "RunResult",
    "RunState",
    "RunnerClosed",
    "__version__",
    "as_completed",
    "load_job",
]

if TYPE_CHECKING:
    from jobrunner.api import AsyncJobRunner, JobRunner
    from jobrunner.errors import JobrunnerError
    from jobrunner.handles import AsyncRunHandle, RunHandle, RunnerClosed, RunResult, as_completed
    from jobrunner.queue import QueueOptions
    from jobrunner.spec import Job, JobSpecError, RetryPolicy, load_job
    from jobrunner.states import RunState
    from jobrunner.store import Run


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jobrunner' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
