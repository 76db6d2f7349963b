"""Which HTTP transport under httpx costs the client the least CPU per request.

    python bench/http_transport.py [--requests 1000] [--concurrency 1 16] [--repeats 5]

Starts a tiny starlette app under uvicorn on 127.0.0.1 (a free port, in a subprocess whose
output is discarded and which is always terminated), then from this process sends small JSON
POSTs through ``httpx.AsyncClient`` with each transport at each concurrency: httpx's default
(httpcore), the ``httpx-aiohttp`` transport, and, when jobrunner is importable, the transport
``jobrunner.machines`` builds by default. For each it prints requests/s and this process's CPU
time (user + sys) per request, each the median of ``--repeats`` runs. The server's CPU is in
another process and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx

PAYLOAD = {"name": "bench", "config": {"image": "python:3.12-slim", "env": {"A": "1"}}}
WARMUP = 50

Factory = Callable[[], httpx.AsyncBaseTransport | None]


def serve(port: int) -> None:
    """Run the app (in the child process)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"id": "1857156b526dd8", "state": "created", "name": body["name"]})

    app = Starlette(routes=[Route("/v1/machines", echo, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 20 s")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def send(client: httpx.AsyncClient, url: str, count: int, concurrency: int) -> None:
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            response = await client.post(url, json=PAYLOAD)
            response.raise_for_status()
            assert response.json()["name"] == "bench"

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(
    make: Factory, base: str, requests: int, concurrency: int, repeats: int
) -> tuple[float, float]:
    """Median requests/s and median client CPU ms per request over ``repeats`` runs."""
    url = base + "/v1/machines"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    rates: list[float] = []
    cpu_ms: list[float] = []
    async with httpx.AsyncClient(transport=make(), limits=limits, timeout=30) as client:
        await send(client, url, WARMUP, concurrency)
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), cpu_seconds()
            await send(client, url, requests, concurrency)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            rates.append(requests / wall)
            cpu_ms.append(cpu * 1000 / requests)
    return statistics.median(rates), statistics.median(cpu_ms)


def transports() -> dict[str, Factory]:
    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    def plain_aiohttp() -> httpx.AsyncBaseTransport:
        # As jobrunner configures it: no cap on connections, cookies left to httpx.
        return AiohttpTransport(
            client=lambda: aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
            )
        )

    found: dict[str, Factory] = {"httpx default": lambda: None, "httpx-aiohttp": plain_aiohttp}
    try:
        from jobrunner.machines._base import default_transport
    except ImportError:
        pass
    else:
        found["jobrunner default"] = default_transport
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per repetition")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    rows: list[tuple[str, int, float, float]] = []
    with server() as base:
        for name, make in transports().items():
            for concurrency in args.concurrency:
                rate, cpu = asyncio.run(
                    measure(make, base, args.requests, concurrency, args.repeats)
                )
                rows.append((name, concurrency, rate, cpu))
                print(f"  {name} c={concurrency}: done", file=sys.stderr)
    print(f"{args.requests} POSTs x {args.repeats} repeats, medians")
    print(f"{'transport':<18} {'conc':>4} {'req/s':>8} {'CPU ms/req':>11}")
    for name, concurrency, rate, cpu in rows:
        print(f"{name:<18} {concurrency:>4} {rate:>8.0f} {cpu:>11.2f}")


if __name__ == "__main__":
    main()
