"""The long-running process that drains the queue: ``jobrunner worker``.

A worker claims due runs of its queues (priority first, then the longest due) whenever it has a
free slot, drives each with the runner on the event loop (no thread per run), and adopts
unfinished runs that nobody drives any more: runs of a worker or ``jobrunner run`` that died, or
whose claim expired. It wakes at once when something is enqueued (:mod:`jobrunner.wakeup`) and
otherwise looks at the ledger every ``poll_interval`` seconds.

Shutdown is graceful: ``stop()`` (SIGTERM or Ctrl-C in the CLI) stops claiming, lets the runs
in hand go on for up to ``grace`` seconds, then lets go of the rest: their machines keep running
and their claims are released, so another worker (or this one, restarted) adopts them and
records their outcome. A worker killed with SIGKILL loses nothing either: its claims expire
(or, on this host, its pid is seen dead) and another worker adopts its runs.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anyio

from jobrunner.claims import CLAIM_TTL
from jobrunner.queue import DEFAULT_QUEUE, check_queue_name
from jobrunner.runner import Runner
from jobrunner.store import Run
from jobrunner.wakeup import Wakeup

__all__ = ["Worker", "WorkerStats"]

logger = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
ORPHAN_INTERVAL = 5.0
# After a drive failed for a reason outside the run (the API or the ledger is down), its slot
# rests this long, so a persistent outage does not turn the claim loop into a busy loop.
ERROR_BACKOFF = 2.0


@dataclass
class WorkerStats:
    """Counts since the worker started."""

    claimed: int = 0
    adopted: int = 0
    finished: int = 0
    errors: int = 0
    released: int = 0


class Worker:
    """Claims and drives queued runs with one :class:`Runner`."""

    def __init__(
        self,
        runner: Runner,
        *,
        queues: Sequence[str] = (DEFAULT_QUEUE,),
        concurrency: int = 16,
        grace: float = 30.0,
        queue_limits: Mapping[str, int] | None = None,
        wakeup: Wakeup | None = None,
        poll_interval: float = POLL_INTERVAL,
        orphan_interval: float = ORPHAN_INTERVAL,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if grace < 0:
            raise ValueError(f"grace must be >= 0 seconds, got {grace}")
        self.runner = runner
        self.queues = [check_queue_name(q) for q in dict.fromkeys(queues or [DEFAULT_QUEUE])]
        self.concurrency = concurrency
        self.grace = grace
        self.queue_limits = dict(queue_limits or {})
        self.stats = WorkerStats()
        self._wakeup = wakeup
        self._poll = poll_interval
        self._orphan_every = orphan_interval
        # Drives in progress per run id. Counted, not a set: a drive that failed rests in its slot
        # (ERROR_BACKOFF) after the runner released the run's claim, so the same run can be
        # claimed and driven again meanwhile, and each of those drives holds a slot of its own.
        self._active: Counter[str] = Counter()
        self._kick = anyio.Event()
        self._stopping = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        """Runs this worker is driving now."""
        return self._active.total()

    def stop(self) -> None:
        """Begin a graceful shutdown: claim nothing more; finish or release what is in hand."""
        self._stopping.set()
        self._kick.set()

    async def run(self) -> WorkerStats:
        """Work until ``stop()``; then drain for up to ``grace`` seconds and return."""
        logger.info(
            "worker %s serving %s with %d slots", self.runner.owner, self.queues, self.concurrency
        )
        async with anyio.create_task_group() as drives:
            async with anyio.create_task_group() as side:
                if self._wakeup is not None:
                    side.start_soon(self._listen)
                side.start_soon(self._adopt_orphans, drives)
                side.start_soon(self._recover_logs)
                await self._claim_loop(drives)
                side.cancel_scope.cancel()
            with anyio.move_on_after(self.grace):
                await self._idle.wait()
            if self._active:
                logger.info("grace period over: releasing %d run(s)", len(self._active))
                self.stats.released += len(self._active)
            # Cancelling a drive releases its claim and leaves its machine running.
            drives.cancel_scope.cancel()
        return self.stats

    async def _claim_loop(self, drives: anyio.abc.TaskGroup) -> None:
        while not self._stopping.is_set():
            free = self.concurrency - self.in_flight
            claimed: list[Run] = []
            if free > 0:
                try:
                    claimed = await self.runner.ledger.claim_due(
                        self.runner.owner,
                        backend=self.runner.backend,
                        queues=self.queues,
                        limit=free,
                        ttl_s=CLAIM_TTL,
                        queue_limits=self.queue_limits,
                    )
                except Exception as exc:  # the ledger is down: keep trying, do not die
                    logger.warning("claiming runs failed (retrying): %s", exc)
                    self.stats.errors += 1
                    await self._rest(ERROR_BACKOFF)
                    continue
                self.stats.claimed += len(claimed)
                for run in claimed:
                    self._start(drives, run)
            if free > 0 and len(claimed) == free:
                continue  # the queue may hold more: look again at once
            await self._rest(self._poll)

    async def _rest(self, seconds: float) -> None:
        """Sleep until kicked (an enqueue, a finished drive, a stop) or ``seconds`` pass."""
        with anyio.move_on_after(seconds):
            await self._kick.wait()
        self._kick = anyio.Event()

    def _start(self, drives: anyio.abc.TaskGroup, run: Run) -> None:
        self._active[run.id] += 1
        self._idle = anyio.Event()
        drives.start_soon(self._drive, run, name=f"drive {run.id}")

    async def _drive(self, claimed: Run) -> None:
        run_id = claimed.id
        try:
            run = await self.runner.drive(run_id, claimed=claimed)
            if run.is_finished:
                self.stats.finished += 1
        except Exception as exc:
            # The run stays in the ledger, unclaimed: it is retried by whoever claims it next.
            self.stats.errors += 1
            logger.warning("run %s could not be driven now: %s", run_id, exc)
            await anyio.sleep(ERROR_BACKOFF)
        finally:
            self._active[run_id] -= 1
            if self._active[run_id] <= 0:
                del self._active[run_id]
            if not self._active:
                self._idle.set()
            self._kick.set()

    async def _listen(self) -> None:
        assert self._wakeup is not None
        while True:
            if await self._wakeup.wait(3600.0):
                self._kick.set()

    async def _recover_logs(self) -> None:
        """Every ``orphan_interval``: copy the last log lines a dead driver left uncopied."""
        while not self._stopping.is_set():
            try:
                await self.runner.recover_logs()
            except Exception as exc:
                logger.warning("copying the logs of finished runs failed (retrying): %s", exc)
            with anyio.move_on_after(self._orphan_every):
                await self._stopping.wait()

    async def _adopt_orphans(self, drives: anyio.abc.TaskGroup) -> None:
        """Every ``orphan_interval``: adopt runs whose driver died or whose claim expired."""
        while not self._stopping.is_set():
            free = self.concurrency - self.in_flight
            if free > 0:
                try:
                    dead = await self.runner.dead_owners()
                    adopted = await self.runner.ledger.claim_orphans(
                        self.runner.owner,
                        backend=self.runner.backend,
                        limit=free,
                        ttl_s=CLAIM_TTL,
                        dead_owners=dead,
                    )
                except Exception as exc:
                    logger.warning("looking for orphaned runs failed (retrying): %s", exc)
                    adopted = []
                for run in adopted:
                    logger.info("adopting run %s (its driver is gone)", run.id)
                    self.stats.adopted += 1
                    self._start(drives, run)
            with anyio.move_on_after(self._orphan_every):
                await self._stopping.wait()
