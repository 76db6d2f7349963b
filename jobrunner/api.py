"""The Python entry points: ``AsyncJobRunner`` for asyncio code, ``JobRunner`` for everything else.

    from jobrunner import Job, JobRunner

    with JobRunner.from_env() as jr:             # local backend unless FLY_API_TOKEN is set
        handle = jr.submit(Job(name="hi", image="alpine", cmd=["echo", "hi"]))
        print(handle.result().outcome, handle.logs())

Two ways to start a run:

* ``submit`` runs the job from this process, in the background (like ``concurrent.futures``): the
  run is recorded already claimed by this runner, then driven by a task of this runner's own task
  group. Closing the runner cancels the drives that are still going: each releases its claim and
  leaves its machine running, and a ``jobrunner worker`` (or ``jobrunner runs reconcile``) adopts
  the run and records its outcome. ``close(wait=True)`` waits for them instead.
* ``enqueue`` only commits a queued run and wakes the workers; it returns at once.

``JobRunner`` is the synchronous face: each method is one forward through a
:class:`~jobrunner._sync.Portal` (an event loop in a daemon thread), so it is safe to share one
``JobRunner`` between threads, e.g. at module level in a web application.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from datetime import datetime
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypedDict, Unpack

import anyio
import anyio.abc
import anyio.to_thread

from jobrunner.config import Settings
from jobrunner.events import EventHandler, RunEvent, ignore_events
from jobrunner.handles import (
    AsyncRunHandle,
    LocalDrive,
    RunExecutor,
    RunHandle,
    RunnerClosed,
    RunnerPortal,
    RunResult,
)
from jobrunner.queue import DEFAULT_QUEUE, QueueOptions, requests_for
from jobrunner.runner import Runner, sole_error
from jobrunner.session import open_runner, open_store
from jobrunner.spec import Job, load_job
from jobrunner.states import RUN_STATES, RunState
from jobrunner.store import default_url
from jobrunner.wakeup import notify

__all__ = ["AsyncJobRunner", "JobRef", "JobRunner", "Overrides", "RunExecutor", "RunnerOptions"]

logger = logging.getLogger(__name__)

JobRef = Job | str | Path
"""A job: a :class:`Job`, or the name or path of a job file (looked up like the CLI does)."""

DEFAULT_CONCURRENCY = 8
POLL_INTERVAL = 0.5


class Overrides(TypedDict, total=False):
    """What ``submit``/``run``/``map`` may change in a job for one run."""

    env: Mapping[str, str]  # merged over the job's env
    timeout: float  # seconds


class RunnerOptions(TypedDict, total=False):
    """The keyword arguments of ``AsyncJobRunner``/``JobRunner`` (and their ``from_env``)."""

    backend: str | None
    app: str | None
    jobs_dir: Path | None
    environ: Mapping[str, str] | None
    on_event: EventHandler
    poll_interval: float


def _with_overrides(job: Job, overrides: Overrides) -> Job:
    unknown = sorted(set(overrides) - set(Overrides.__annotations__))
    if unknown:
        raise TypeError(
            f"unknown override(s) {', '.join(unknown)}: a run may override env, timeout"
        )
    if not overrides:
        return job
    return job.with_overrides(env=overrides.get("env"), timeout=overrides.get("timeout"))


def _closed_before(run_id: str) -> str:
    return (
        f"the JobRunner was closed before run {run_id} finished; its machine keeps running and "
        "a `jobrunner worker` or `jobrunner runs reconcile` records its outcome "
        "(read it with `runner.get(run_id)` from any process)"
    )


class AsyncJobRunner:
    """Submit, enqueue, wait for and cancel runs from asyncio code.

    Open it with ``async with AsyncJobRunner.from_env() as jr:`` (or ``await jr.open()`` and
    ``await jr.aclose()``). Backend, app and ledger are chosen as the CLI chooses them: keyword
    arguments, then ``JOBRUNNER_BACKEND``/``FLY_APP``/``JOBRUNNER_DATABASE_URL``, with the local
    backend when no Fly token is set.
    """

    def __init__(
        self,
        *,
        backend: str | None = None,
        app: str | None = None,
        jobs_dir: Path | None = None,
        environ: Mapping[str, str] | None = None,
        on_event: EventHandler = ignore_events,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.settings = Settings.from_env(backend=backend, app=app, environ=environ)
        self.jobs_dir = jobs_dir
        self.poll_interval = poll_interval
        self._environ = environ
        self._on_event = on_event
        self._runner: Runner | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._host: asyncio.Task[None] | None = None
        self._closing: anyio.Event | None = None
        self._closed = False
        # Where workers listen for wake-ups: the same spelling as ``jobrunner worker`` uses.
        self._database_url = self.settings.database_url or default_url()
        # Runs this process drives, until their drive ends (handles keep their own reference).
        self._local: dict[str, LocalDrive] = {}

    @classmethod
    def from_env(cls, **options: Unpack[RunnerOptions]) -> Self:
        """A runner for the backend, app and ledger the environment names (as the CLI picks)."""
        return cls(**options)

    # ---- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect to the backend (starting the local one if needed) and the ledger."""
        if self._closed:
            raise RunnerClosed("this runner was closed; create a new one")
        if self._host is not None:
            return
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._closing = anyio.Event()
        # The runner and the task group of the drives live in one host task, so that they are
        # entered and left by the same task whichever task (or Portal call) opens and closes.
        self._host = loop.create_task(self._serve(ready), name="jobrunner api")
        try:
            await ready
        except BaseException:
            self._closed = True
            self._closing.set()
            raise

    async def _serve(self, ready: asyncio.Future[None]) -> None:
        try:
            store = await anyio.to_thread.run_sync(open_store, self.settings)
        except BaseException as exc:
            _fail(ready, exc)
            return
        try:
            async with open_runner(
                self.settings, store=store, on_event=self._dispatch, environ=self._environ
            ) as runner:
                assert self._closing is not None
                async with anyio.create_task_group() as group:
                    self._runner, self._group = runner, group
                    if not ready.done():  # done: the opener was cancelled meanwhile
                        ready.set_result(None)
                    await self._closing.wait()
                    group.cancel_scope.cancel()
                self._group = None
                await self._let_go(runner)
        except BaseException as exc:
            if not ready.done():
                _fail(ready, exc)
                return
            raise
        finally:
            self._runner = self._group = None
            await anyio.to_thread.run_sync(store.close)

    async def _let_go(self, runner: Runner) -> None:
        """Release the claims of runs whose drive did not finish (or never started)."""
        with anyio.CancelScope(shield=True):
            for run_id, local in list(self._local.items()):
                local.fail(RunnerClosed(_closed_before(run_id)))
                try:
                    await runner.ledger.release_claim(run_id, runner.owner)
                except Exception as exc:  # its claim expires on its own
                    logger.warning("could not release run %s: %s", run_id, exc)
            self._local.clear()

    async def aclose(self, *, wait: bool = False) -> None:
        """Close the runner. Drives still going are cancelled (their runs are left to the
        workers, machines running), unless ``wait``: then they are awaited first."""
        host = self._host
        if host is None or self._closed:
            self._closed = True
            return
        if wait:
            while pending := [d for d in self._local.values() if not d.done.is_set()]:
                await pending[0].done.wait()
        self._closed = True
        assert self._closing is not None
        self._closing.set()
        await host

    @property
    def runner(self) -> Runner:
        """The engine underneath (``jobrunner.runner.Runner``)."""
        if self._runner is None or self._closed:
            raise RunnerClosed("the runner is not open: use `async with AsyncJobRunner() as jr:`")
        return self._runner

    def _spawn(self, fn: Any, *args: Any) -> None:
        """Start ``fn(*args)`` in this runner's task group (cancelled when the runner closes)."""
        if self._group is None or self._closed:
            raise RunnerClosed("the runner is closed")
        self._group.start_soon(fn, *args)

    def _dispatch(self, event: RunEvent) -> None:
        local = self._local.get(event.run_id)
        if local is not None and not local.done.is_set():
            if event.kind == "state" and event.state in RUN_STATES:
                local.state = RunState(event.state)
            elif event.kind == "retry":
                local.state = RunState.PENDING
        self._on_event(event)

    async def _resolve(self, job: JobRef, *, check_secrets: bool) -> Job:
        if isinstance(job, Job):
            return job
        if isinstance(job, str | Path):
            load = partial(
                load_job,
                job,
                jobs_dir=self.jobs_dir,
                check_secrets=check_secrets,
                environ=self._environ,
            )
            return await anyio.to_thread.run_sync(load)
        raise TypeError(f"expected a Job or a job file's name or path, got {type(job).__name__}")

    # ---- running here -----------------------------------------------------------------------

    async def submit(self, job: JobRef, **overrides: Unpack[Overrides]) -> AsyncRunHandle:
        """Record a run of ``job`` and drive it in the background; returns at once.

        ``overrides``: ``env`` (merged over the job's) and ``timeout`` (seconds).
        """
        runner = self.runner
        the_job = _with_overrides(await self._resolve(job, check_secrets=True), overrides)
        record = await runner.submit(the_job, trigger="python")
        local = LocalDrive(RunState(record.state))
        self._local[record.id] = local
        try:
            self._spawn(self._drive, runner, record.id, local)
        except RunnerClosed:
            self._local.pop(record.id, None)
            await runner.ledger.release_claim(record.id, runner.owner)
            raise
        return AsyncRunHandle(self, record, local)

    async def _drive(self, runner: Runner, run_id: str, local: LocalDrive) -> None:
        try:
            record = await runner.wait(run_id, poll=self.poll_interval)
            await runner.logs_settled(run_id)
            last = await runner.ledger.latest_attempt(run_id)
            local.finish(record, RunResult.from_records(record, last))
        except anyio.get_cancelled_exc_class():
            # Closing: left in ``_local`` so that ``_let_go`` releases the run's claim.
            local.fail(RunnerClosed(_closed_before(run_id)))
            raise
        except Exception as exc:
            logger.warning(
                "run %s could not be driven: %s", run_id, exc, extra={"action": "drive_failed"}
            )
            local.fail(exc)
            # Left for a worker or ``runs reconcile`` at once, not when the born claim expires.
            with contextlib.suppress(Exception):
                await runner.ledger.release_claim(run_id, runner.owner)
        self._local.pop(run_id, None)

    async def run(self, job: JobRef, **overrides: Unpack[Overrides]) -> RunResult:
        """Submit ``job`` and wait for its result."""
        handle = await self.submit(job, **overrides)
        return await handle.result()

    async def map(
        self, jobs: Iterable[JobRef], *, concurrency: int = DEFAULT_CONCURRENCY
    ) -> list[RunResult]:
        """Run every job, at most ``concurrency`` at once; the results in the jobs' order.

        Every job is loaded before the first run starts; a run starts (and is recorded) only when
        a slot is free. A failed run is a result, not an error: check ``result.ok``.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        resolved = [await self._resolve(job, check_secrets=True) for job in jobs]
        results: dict[int, RunResult] = {}
        limiter = anyio.Semaphore(concurrency)

        async def one(index: int, job: Job) -> None:
            async with limiter:
                results[index] = await self.run(job)

        try:
            async with anyio.create_task_group() as group:
                for index, job in enumerate(resolved):
                    group.start_soon(one, index, job)
        except BaseExceptionGroup as errors:
            raise sole_error(errors) from None
        return [results[index] for index in range(len(resolved))]

    async def _start_future(
        self,
        job: JobRef,
        overrides: Overrides,
        future: Future[RunResult],
        limiter: anyio.Semaphore,
    ) -> None:
        self._spawn(self._fulfil, job, overrides, future, limiter)

    async def _fulfil(
        self,
        job: JobRef,
        overrides: Overrides,
        future: Future[RunResult],
        limiter: anyio.Semaphore,
    ) -> None:
        """One work item of a :class:`RunExecutor`: wait for a slot, then run the job."""
        try:
            if future.cancelled():
                future.set_running_or_notify_cancel()
                return
            async with limiter:
                if not future.set_running_or_notify_cancel():
                    return  # cancelled while it waited for a slot
                try:
                    result = await self.run(job, **overrides)
                except Exception as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
        except anyio.get_cancelled_exc_class():
            if future.running():
                future.set_exception(RunnerClosed("the JobRunner was closed before the run ended"))
            elif future.cancel():
                future.set_running_or_notify_cancel()
            raise

    # ---- queueing ---------------------------------------------------------------------------

    async def enqueue(
        self,
        job: JobRef,
        *,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        run_at: datetime | None = None,
        delay: float | None = None,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
    ) -> AsyncRunHandle:
        """Commit a queued run of ``job`` for the workers and return at once.

        ``priority``: higher first. ``run_at`` (an aware datetime) or ``delay`` (seconds): not
        before then. ``idempotency_key``: an unfinished (or recently finished) run with the same
        key is returned instead of a new one. ``max_attempts`` overrides the job's retries.
        """
        options = QueueOptions(
            queue=queue,
            priority=priority,
            run_at=run_at,
            delay=delay,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
        )
        [handle] = await self.enqueue_many([(job, options)])
        return handle

    async def enqueue_many(
        self,
        jobs: Iterable[JobRef | tuple[JobRef, QueueOptions]],
        *,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        run_at: datetime | None = None,
        delay: float | None = None,
        max_attempts: int | None = None,
    ) -> list[AsyncRunHandle]:
        """Enqueue several runs in one transaction (all or none); handles in the same order.

        A bare job uses the keyword arguments; a ``(job, QueueOptions(...))`` pair its own
        options (for per-run priorities or idempotency keys). Everything is checked first.
        """
        runner = self.runner
        shared = QueueOptions(
            queue=queue, priority=priority, run_at=run_at, delay=delay, max_attempts=max_attempts
        )
        loaded: dict[str | Path, Job] = {}
        pairs: list[tuple[Job, QueueOptions]] = []
        for item in jobs:
            ref, options = item if isinstance(item, tuple) else (item, shared)
            if isinstance(ref, Job):
                pairs.append((ref, options))
                continue
            if ref not in loaded:
                loaded[ref] = await self._resolve(ref, check_secrets=False)
            pairs.append((loaded[ref], options))
        requests = requests_for(pairs, backend=runner.backend, app=runner.app, clock=runner.clock)
        if not requests:
            return []
        rows = await runner.ledger.enqueue_runs(requests)
        if any(created for _, created in rows):
            notify(database_url=self._database_url, home=self.settings.home)
        return [AsyncRunHandle(self, record, self._local.get(record.id)) for record, _ in rows]

    # ---- reading ----------------------------------------------------------------------------

    async def get(self, run_id: str) -> AsyncRunHandle:
        """A handle on any run in the ledger (a unique prefix of its id is enough)."""
        record = await self.runner.ledger.get_run(run_id)
        return AsyncRunHandle(self, record, self._local.get(record.id))


def _fail(ready: asyncio.Future[None], exc: BaseException) -> None:
    if isinstance(exc, asyncio.CancelledError):
        ready.cancel()
    else:
        ready.set_exception(exc)


class JobRunner:
    """The synchronous face of :class:`AsyncJobRunner`: the same methods, blocking.

    Opens on creation (``JobRunner.from_env()``); close it with ``close()`` or a ``with`` block.
    One instance may be shared by any number of threads.
    """

    def __init__(
        self,
        *,
        backend: str | None = None,
        app: str | None = None,
        jobs_dir: Path | None = None,
        environ: Mapping[str, str] | None = None,
        on_event: EventHandler = ignore_events,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._async = AsyncJobRunner(
            backend=backend,
            app=app,
            jobs_dir=jobs_dir,
            environ=environ,
            on_event=on_event,
            poll_interval=poll_interval,
        )
        self._lock = threading.Lock()
        self._closed = False
        self._portal = RunnerPortal()
        try:
            self._portal.call(self._async.open)
        except BaseException:
            self._portal.close()
            raise

    @classmethod
    def from_env(cls, **options: Unpack[RunnerOptions]) -> Self:
        """A runner for the backend, app and ledger the environment names (as the CLI picks)."""
        return cls(**options)

    @property
    def settings(self) -> Settings:
        return self._async.settings

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, *, wait: bool = False) -> None:
        """Close the runner; see :meth:`AsyncJobRunner.aclose`. Closing twice does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._portal.call(self._async.aclose, wait=wait)
        finally:
            self._portal.close()

    def _handle(self, core: AsyncRunHandle) -> RunHandle:
        return RunHandle(core, self._portal)

    def submit(self, job: JobRef, **overrides: Unpack[Overrides]) -> RunHandle:
        """Record a run of ``job`` and drive it in the background; returns at once."""
        return self._handle(self._portal.call(self._async.submit, job, **overrides))

    def run(self, job: JobRef, **overrides: Unpack[Overrides]) -> RunResult:
        """Submit ``job`` and wait for its result."""
        return self._portal.call(self._async.run, job, **overrides)

    def map(
        self, jobs: Iterable[JobRef], *, concurrency: int = DEFAULT_CONCURRENCY
    ) -> list[RunResult]:
        """Run every job, at most ``concurrency`` at once; the results in the jobs' order."""
        return self._portal.call(self._async.map, list(jobs), concurrency=concurrency)

    def enqueue(
        self,
        job: JobRef,
        *,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        run_at: datetime | None = None,
        delay: float | None = None,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
    ) -> RunHandle:
        """Commit a queued run of ``job`` for the workers and return at once."""
        core = self._portal.call(
            self._async.enqueue,
            job,
            queue=queue,
            priority=priority,
            run_at=run_at,
            delay=delay,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
        )
        return self._handle(core)

    def enqueue_many(
        self,
        jobs: Iterable[JobRef | tuple[JobRef, QueueOptions]],
        *,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        run_at: datetime | None = None,
        delay: float | None = None,
        max_attempts: int | None = None,
    ) -> list[RunHandle]:
        """Enqueue several runs in one transaction (all or none); handles in the same order."""
        cores = self._portal.call(
            self._async.enqueue_many,
            list(jobs),
            queue=queue,
            priority=priority,
            run_at=run_at,
            delay=delay,
            max_attempts=max_attempts,
        )
        return [self._handle(core) for core in cores]

    def get(self, run_id: str) -> RunHandle:
        """A handle on any run in the ledger (a unique prefix of its id is enough)."""
        return self._handle(self._portal.call(self._async.get, run_id))

    def executor(self, max_workers: int = DEFAULT_CONCURRENCY) -> RunExecutor:
        """A ``concurrent.futures.Executor`` running jobs, at most ``max_workers`` at once."""
        return RunExecutor(self, max_workers, limiter=self._portal.call(_semaphore, max_workers))


async def _semaphore(value: int) -> anyio.Semaphore:
    if value < 1:
        raise ValueError(f"max_workers must be at least 1, got {value}")
    return anyio.Semaphore(value)
