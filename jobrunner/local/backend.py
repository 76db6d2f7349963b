"""One running local backend: the database, the machines, the background loops, put together.

``LocalBackend`` is built from ``ServerSettings`` and started by the ASGI lifespan, so the same
object serves a uvicorn process (``jobrunner local serve``) or an in-process test server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from jobrunner import __version__
from jobrunner.clock import SYSTEM_CLOCK, Clock
from jobrunner.local.api.faults import FaultInjector
from jobrunner.local.fleet.clock import FakeClock
from jobrunner.local.fleet.lifecycle import Lifecycle
from jobrunner.local.fleet.machines import MachineService
from jobrunner.local.fleet.registry import Registry
from jobrunner.local.fleet.retention import run_purger
from jobrunner.local.fleet.schedule import ScheduleRunner
from jobrunner.local.process.shim_client import ShimClient
from jobrunner.local.settings import ServerSettings
from jobrunner.local.state.database import StateDatabase
from jobrunner.local.state.logstore import LogStore
from jobrunner.local.statefiles import DB_FILE, SERVICE_NAME, make_state_dir

__all__ = ["LocalBackend"]

logger = logging.getLogger("jobrunner.local")


class LocalBackend:
    """The server's parts, wired together; ``lifespan`` starts and stops them."""

    def __init__(
        self,
        settings: ServerSettings,
        clock: Clock | None = None,
        *,
        use_shim: bool = True,
        stop_machines: bool = True,
    ) -> None:
        self.settings = settings
        #: On stop: True stops every machine and records its exit (the old, in-process way);
        #: False leaves them to the shim for the next server to adopt.
        self.stop_machines = stop_machines
        self.clock: Clock = clock or (FakeClock() if settings.fake_clock else SYSTEM_CLOCK)
        self.faults = FaultInjector(settings.faults)
        make_state_dir(settings.state_dir)
        self.store = StateDatabase(settings.state_dir / DB_FILE)
        self.registry = Registry(self.store, self.clock)
        self.logs = LogStore(self.store)
        # The shim is the parent of the machines' processes, so they outlive this server.
        self.shim = ShimClient(settings.state_dir) if use_shim else None
        if self.shim is not None:
            self.shim.flush = self.flush
            self.shim.stored_seq = self.store.shim_seq
            self.logs.position = self.shim.position
        self.lifecycle = Lifecycle(self.registry, self.logs, settings.state_dir, shim=self.shim)
        self.service = MachineService(self.registry, self.lifecycle)
        self.scheduler = ScheduleRunner(self.registry, self.clock, self.service.boot_by)
        self._tasks: list[asyncio.Task[None]] = []

    def flush(self) -> None:
        """Write everything pending: machine states, events, log lines."""
        self.registry.flush_writes()
        self.logs.flush()

    def health(self) -> dict[str, Any]:
        """The unauthenticated /healthz answer: enough for a client to know whose server it is."""
        return {
            "ok": True,
            "service": SERVICE_NAME,
            "version": __version__,
            "pid": os.getpid(),
            "state_dir": str(self.settings.state_dir),
        }

    async def start(self) -> None:
        self.registry.load()
        self.service.ensure_app(self.settings.default_app)
        if self.shim is not None:
            live = await self.shim.connect()
            self.lifecycle.adopt(live)
            self.shim.adopted()
            await self.shim.replayed()  # every exit that happened while no server ran is in
        else:
            self.lifecycle.recover()
        self._tasks = [
            asyncio.create_task(self.logs.run_flusher()),
            asyncio.create_task(self.scheduler.run()),
            asyncio.create_task(
                run_purger(
                    self.registry,
                    self.logs,
                    self.clock,
                    self.settings.retention,
                    self.settings.log_retention,
                )
            ),
        ]
        if self.settings.faults is not None and self.settings.faults.active:
            logger.warning("fault injection is on: %s", self.settings.faults)

    def begin_shutdown(self) -> None:
        """Release every long-poll now, so the HTTP server can drain quickly."""
        self.registry.closing = True
        self.registry.wake_all()

    async def stop(self) -> None:
        self.begin_shutdown()
        if self.stop_machines or self.shim is None:
            await self.lifecycle.shutdown()
        else:
            await self.lifecycle.detach()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.flush()
        if self.shim is not None:
            # Acknowledges what was stored. The shim exits once it has nothing left to do; with
            # machines left running, it keeps them for the next server.
            await self.shim.close(final=self.stop_machines)
        self.registry.flush_writes()
        self.store.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()
