"""Builds the objects a command needs from settings: the Machines client, the store, the runner.

This is the only place that knows how the local backend is found or started, so the CLI and the
Python API connect the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio.to_thread

from jobrunner.config import Settings
from jobrunner.events import EventHandler, ignore_events
from jobrunner.machines import AsyncMachinesClient
from jobrunner.machines.errors import NotFound
from jobrunner.machines.ratelimit import SharedRateLimiter
from jobrunner.runner import Runner
from jobrunner.store import SqlLedger, Store


async def open_client(settings: Settings, store: Store | None = None) -> AsyncMachinesClient:
    """A client for the configured backend; starts the local backend in the background if needed.

    On Fly, with a ``store``, the API's rate limits are kept in the ledger, so every process
    sharing it (several ``jobrunner run``s, several workers) stays under them together.
    """
    if settings.backend == "local":
        from jobrunner.local.daemon import ensure_running

        endpoint = await anyio.to_thread.run_sync(
            lambda: ensure_running(settings.local_state_dir, port=settings.local_port)
        )
        client = AsyncMachinesClient(
            settings.app,
            token=endpoint.token,
            base_url=endpoint.base_url,
            logs_base_url=endpoint.base_url,
            # The local backend has no rate limits (Fly's are kept on Fly): spacing creates at
            # 1/s would make a worker on this computer 300 times slower than it can be.
            rate_limit=False,
        )
        await _ensure_local_app(client, settings.app)
        return client
    if store is None:
        return AsyncMachinesClient.from_env(app=settings.app)
    ledger = SqlLedger(store)
    return AsyncMachinesClient.from_env(
        app=settings.app, limiter=SharedRateLimiter(ledger.take_rate_token)
    )


async def _ensure_local_app(client: AsyncMachinesClient, app: str) -> None:
    """On this computer an app is only a namespace, so ``--app NAME`` creates it on first use
    (on Fly, creating apps stays the user's decision: ``fly apps create``)."""
    try:
        await client.get_app(app)
    except NotFound:
        await client.create_app(app)


def open_store(settings: Settings) -> Store:
    return Store(settings.database_url)


@asynccontextmanager
async def open_runner(
    settings: Settings,
    *,
    store: Store | None = None,
    on_event: EventHandler = ignore_events,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[Runner]:
    """A Runner wired to the configured backend and store; closes what it opened."""
    own_store = store is None
    the_store = store if store is not None else await anyio.to_thread.run_sync(open_store, settings)
    client = await open_client(settings, the_store)
    fast = settings.backend == "local"
    try:
        async with Runner(
            client,
            the_store,
            backend=settings.backend,
            app=settings.app,
            environ=environ,
            on_event=on_event,
            # The local backend stores every line before it records the exit, so one more poll
            # after the exit finds them all; Fly's logs API can lag by seconds.
            log_poll_interval=0.2 if fast else 1.0,
            log_drain_grace=0.05 if fast else 10.0,
        ) as runner:
            yield runner
    finally:
        await client.aclose()
        if own_store:
            the_store.close()
