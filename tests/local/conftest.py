"""Fixtures for the local backend tests: one real server per test module, and an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from .local_harness import ServerProcess, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with admin endpoints, on the real clock, for the whole test module."""
    process = start_server(tmp_path_factory.mktemp("local") / "state", "--enable-admin")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def api(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    """An authenticated raw HTTP client for ``server``."""
    async with server.client() as client:
        yield client
