"""The Python entry points: ``AsyncJobRunner`` for asyncio code, ``JobRunner`` for everything else.

    from jobrunner import Job, JobRunner

    with JobRunner() as jr:                      # local backend unless FLY_API_TOKEN is set
        run = jr.run(Job(name="hi", image="python:3.12-slim", cmd=["python3", "-c", "print(1)"]))
        print(run.state, run.exit_code, jr.logs(run.id))

Both wrap the same ``Runner``; ``JobRunner`` forwards each call through one event-loop thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AsyncExitStack
from types import TracebackType

import anyio.to_thread

from jobrunner._sync import Portal
from jobrunner.config import Settings
from jobrunner.events import EventHandler, ignore_events
from jobrunner.runner import Runner
from jobrunner.session import open_runner
from jobrunner.spec import Job
from jobrunner.store import Run


class AsyncJobRunner:
    """Submit, run, wait for and cancel jobs from asyncio code."""

    def __init__(
        self,
        *,
        backend: str | None = None,
        app: str | None = None,
        on_event: EventHandler = ignore_events,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = Settings.from_env(backend=backend, app=app, environ=environ)
        self._on_event = on_event
        self._environ = environ
        self._stack: AsyncExitStack | None = None
        self._runner: Runner | None = None

    async def __aenter__(self) -> AsyncJobRunner:
        stack = AsyncExitStack()
        self._runner = await stack.enter_async_context(
            open_runner(self.settings, on_event=self._on_event, environ=self._environ)
        )
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._runner = self._stack, None, None
            await stack.aclose()

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            raise RuntimeError("use `async with AsyncJobRunner() as jr:` before calling it")
        return self._runner

    async def submit(self, job: Job) -> Run:
        """Record a pending run of ``job`` and return it without creating a machine.

        ``wait(run.id)``, here or in any other process sharing the ledger, drives it to its outcome.
        """
        return await self.runner.submit(job, trigger="python")

    async def run(self, job: Job) -> Run:
        """Run ``job`` to its outcome and return the finished run."""
        return await self.runner.run(job, trigger="python")

    async def wait(self, run_id: str) -> Run:
        return await self.runner.wait(run_id)

    async def cancel(self, run_id: str) -> Run:
        return await self.runner.cancel(run_id)

    async def get(self, run_id: str) -> Run:
        return await anyio.to_thread.run_sync(self.runner.store.get_run, run_id)

    async def logs(self, run_id: str) -> list[str]:
        """The run's captured output lines, in order."""
        run = await self.get(run_id)
        lines = await anyio.to_thread.run_sync(self.runner.store.get_logs, run.id)
        return [line.message for line in lines]


class JobRunner:
    """The synchronous face of ``AsyncJobRunner``: same methods, blocking."""

    def __init__(
        self,
        *,
        backend: str | None = None,
        app: str | None = None,
        on_event: EventHandler = ignore_events,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._portal = Portal()
        self._async = AsyncJobRunner(backend=backend, app=app, on_event=on_event, environ=environ)
        self._portal.call(self._async.__aenter__)

    def __enter__(self) -> JobRunner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._portal.call(self._async.aclose)
        finally:
            self._portal.close()

    def submit(self, job: Job) -> Run:
        return self._portal.call(self._async.submit, job)

    def run(self, job: Job) -> Run:
        return self._portal.call(self._async.run, job)

    def wait(self, run_id: str) -> Run:
        return self._portal.call(self._async.wait, run_id)

    def cancel(self, run_id: str) -> Run:
        return self._portal.call(self._async.cancel, run_id)

    def get(self, run_id: str) -> Run:
        return self._portal.call(self._async.get, run_id)

    def logs(self, run_id: str) -> list[str]:
        return self._portal.call(self._async.logs, run_id)
