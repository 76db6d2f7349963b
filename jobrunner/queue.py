"""Putting runs on the durable queue: one ``RunRequest`` per job, one transaction per batch.

A queued run is an ordinary run row with a queue name: ``enqueue`` returns as soon as the row is
committed, whichever backend the job will run on, and any ``jobrunner worker`` that serves the
queue claims it when it is due (see :mod:`jobrunner.worker`). Idle workers are woken at once
(a datagram to each worker on this host, and ``NOTIFY`` on PostgreSQL for the others), so a
worker does not need to poll the ledger often to start a run within milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from jobrunner.clock import SYSTEM_CLOCK, Clock
from jobrunner.errors import ConfigError
from jobrunner.spec import Job
from jobrunner.store import RunRequest

__all__ = ["DEFAULT_QUEUE", "QueueOptions", "check_queue_name", "run_request"]

DEFAULT_QUEUE = "default"
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def check_queue_name(name: str) -> str:
    """``name`` if it is a valid queue name; a ConfigError that says what is allowed if not."""
    if not isinstance(name, str) or not _QUEUE_NAME.match(name):
        raise ConfigError(
            f"queue name {name!r} is not valid: use 1-64 letters, digits, '_', '.', ':' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class QueueOptions:
    """How one run is queued (the keyword arguments of ``enqueue``)."""

    queue: str = DEFAULT_QUEUE
    priority: int = 0
    run_at: datetime | None = None
    delay: float | None = None
    idempotency_key: str | None = None
    max_attempts: int | None = None

    def due(self, clock: Clock) -> datetime | None:
        """When the run may start (None: now). ``run_at`` and ``delay`` cannot both be given."""
        if self.run_at is not None and self.delay is not None:
            raise ValueError("give run_at or delay, not both")
        if self.run_at is not None:
            if self.run_at.tzinfo is None:
                raise ValueError(
                    f"run_at must be timezone-aware (e.g. datetime.now(UTC)), got {self.run_at!r}"
                )
            return self.run_at
        if self.delay is not None:
            if not self.delay >= 0:  # also refuses NaN
                raise ValueError(f"delay must be a number of seconds >= 0, got {self.delay!r}")
            return clock.now() + timedelta(seconds=self.delay)
        return None


def run_request(
    job: Job,
    options: QueueOptions,
    *,
    backend: str,
    app: str,
    clock: Clock = SYSTEM_CLOCK,
) -> RunRequest:
    """The ledger row for ``job`` queued with ``options`` on ``backend``."""
    check_queue_name(options.queue)
    if isinstance(options.priority, bool) or not isinstance(options.priority, int):
        raise ValueError(f"priority must be an int, got {options.priority!r}")
    max_attempts = options.max_attempts or job.retries.max_attempts
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    key = options.idempotency_key
    if key is not None and not 1 <= len(key) <= 255:
        raise ValueError("idempotency_key must be 1 to 255 characters long")
    return RunRequest(
        job_name=job.name,
        job_snapshot=job.snapshot(),
        backend=backend,
        app=job.app or app,
        region=job.region,
        max_attempts=max_attempts,
        timeout_s=job.timeout,
        trigger="queue",
        queue=options.queue,
        priority=options.priority,
        run_at=options.due(clock),
        idempotency_key=key,
    )


def requests_for(
    jobs: Sequence[tuple[Job, QueueOptions]],
    *,
    backend: str,
    app: str,
    clock: Clock = SYSTEM_CLOCK,
) -> list[RunRequest]:
    """Ledger rows for several jobs; every one is checked before any is written."""
    return [run_request(job, opts, backend=backend, app=app, clock=clock) for job, opts in jobs]
