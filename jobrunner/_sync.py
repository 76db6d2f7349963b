"""The one bridge from synchronous callers to the async core.

Every sync facade (``MachinesClient``, the sync runner API) owns a ``Portal``: an event loop in a
daemon thread. Each sync method is a one-line forward through ``Portal.call``, so no logic is
written twice. This is the pattern of APScheduler 4's sync scheduler (anyio's blocking portal).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, ParamSpec, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

T = TypeVar("T")
P = ParamSpec("P")


class Portal:
    """Runs coroutines on a private event loop thread and hands back their results."""

    def __init__(self) -> None:
        self._cm: contextlib.AbstractContextManager[BlockingPortal] | None = start_blocking_portal()
        self._portal: BlockingPortal | None = self._cm.__enter__()

    def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the loop thread and return its result (or raise)."""
        if self._portal is None:
            raise RuntimeError("this client is closed")

        async def run() -> T:
            return await fn(*args, **kwargs)

        return self._portal.call(run)

    def iterate(self, make: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        """Drive an async iterator from sync code, one item per round trip to the loop."""
        if self._portal is None:
            raise RuntimeError("this client is closed")
        portal = self._portal
        iterator = portal.call(_make_iter, make)
        sentinel: Any = _END
        try:
            while True:
                item = portal.call(_next_or, iterator, sentinel)
                if item is sentinel:
                    return
                yield item
        finally:
            closer = getattr(iterator, "aclose", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    portal.call(closer)

    def close(self) -> None:
        if self._cm is not None:
            cm, self._cm, self._portal = self._cm, None, None
            cm.__exit__(None, None, None)


_END = object()


async def _make_iter(make: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
    return make()


async def _next_or(iterator: AsyncIterator[T], sentinel: Any) -> Any:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return sentinel
