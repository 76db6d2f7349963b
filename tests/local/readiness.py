"""Waiting until a machine's program is ready (it printed a line), before signalling it.

``started`` means the program was executed, as on Fly, not that it has set up its signal
handlers yet: a shell needs a moment to reach its ``trap``. A test that signals a program must
wait for the program to say it is ready, or it races the shell's start-up.
"""

from __future__ import annotations

import asyncio

import httpx

from .local_harness import APP

READY = "echo ready"


async def wait_ready(
    api: httpx.AsyncClient, machine_id: str, line: str = "ready", timeout: float = 30.0
) -> None:
    """Wait until ``line`` is in the machine's logs; fail the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        page = await api.get(
            f"/api/v1/apps/{APP}/logs", params={"instance": machine_id, "next_token": "0"}
        )
        messages = [e["attributes"]["message"] for e in page.json()["data"]]
        if line in messages:
            return
        assert loop.time() < deadline, f"{machine_id} never printed {line!r}: {messages}"
        await asyncio.sleep(0.02)
