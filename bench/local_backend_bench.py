"""The local backend's own cost per machine, and machines/s end to end.

    python bench/local_backend_bench.py [--machines 300] [--rounds 5] [--concurrency 16]
                                        [--baseline-src DIR]

Starts a private local backend server (``python -m jobrunner.local serve``, a temporary state
dir, any free port) and, per round, pushes ``--machines`` ``sh -c true`` machines (no files)
through it at ``--concurrency``: create, wait for ``stopped``, get, logs; the client is httpx
over the project's aiohttp transport, in this process. It reads the CPU time (user + system,
from /proc/<pid>/stat) of

* the server process,
* the shim (the supervisor process that is the parent of the jobs), and
* their reaped children (the jobs themselves, plus a launcher per machine where one is used),

before and after each round, and prints the medians over the rounds: CPU ms per machine of each
(and of the benchmark's own HTTP client, which shares the CPUs) and machines/s. A baseline in
the same run: ``sh -c true`` started from this process with ``subprocess`` (CPU of parent and
child per start).

``--baseline-src [LABEL=]DIR`` (repeatable) also measures another copy of the code (e.g. the
previous commit: ``git archive HEAD jobrunner | tar -x -C /tmp/base``, then
``--baseline-src before=/tmp/base``), run the same way, so before and after come from the same
run on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from jobrunner.machines._base import default_transport

TOKEN = "bench-token-0123456789"
APP = "jobrunner-local"
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int | None) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of ``pid``; zeros once it is gone."""
    if pid is None:
        return 0.0, 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / _TICK, (cutime + cstime) / _TICK


def _shim_pid(state_dir: Path) -> int | None:
    wanted = [b"jobrunner.local.process.shim", str(state_dir).encode()]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(part in argv for part in wanted):
                return int(entry.name)
    return None


@dataclass
class Round:
    wall: float
    server_ms: float
    shim_ms: float
    children_ms: float
    client_ms: float


class Server:
    def __init__(self, source: Path | None, home: Path) -> None:
        self.state_dir = home / "state"
        self.state_dir.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_LOCAL_")}
        env["JOBRUNNER_LOCAL_TOKEN"] = TOKEN
        if source is not None:
            env["PYTHONPATH"] = str(source)
        self.log = open(home / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jobrunner.local", "serve", "--port", "0",
             "--state-dir", str(self.state_dir)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            env=env, cwd=home, start_new_session=True,
        )  # fmt: skip
        self.base_url = self._wait_listening()

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.returncode}")
            try:
                info = json.loads((self.state_dir / "server.json").read_text())
                if info.get("pid") == self.process.pid:
                    return str(info["base_url"])
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: stops its machines; the shim then exits
        self.process.wait(60)
        self.log.close()
        deadline = time.monotonic() + 30
        while _shim_pid(self.state_dir) is not None and time.monotonic() < deadline:
            time.sleep(0.05)


async def _one(api: httpx.AsyncClient) -> None:
    config = {
        "image": "bench:1",
        "init": {"cmd": ["sh", "-c", "true"]},
        "restart": {"policy": "no"},
    }
    created = await api.post(f"/v1/apps/{APP}/machines", json={"config": config})
    created.raise_for_status()
    machine_id = created.json()["id"]
    base = f"/v1/apps/{APP}/machines/{machine_id}"
    waited = await api.get(base + "/wait", params={"state": "stopped", "timeout": 60})
    waited.raise_for_status()
    (await api.get(base)).raise_for_status()
    logs = await api.get(f"/api/v1/apps/{APP}/logs", params={"instance": machine_id})
    logs.raise_for_status()


async def _round(server: Server, machines: int, concurrency: int) -> Round:
    # The project's own client transport (aiohttp under httpx): the client shares the CPUs with
    # the backend, and httpx's default transport costs several times more per request.
    async with httpx.AsyncClient(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=120,
        transport=default_transport(),
        trust_env=False,
    ) as api:
        await _one(api)  # warm: connections open, shim running
        shim = _shim_pid(server.state_dir)
        server_before, shim_before = _cpu(server.process.pid), _cpu(shim)
        queue: asyncio.Queue[None] = asyncio.Queue()
        for _ in range(machines):
            queue.put_nowait(None)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                await _one(api)

        client_before = time.process_time()
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - began
        client = time.process_time() - client_before
        server_after, shim_after = _cpu(server.process.pid), _cpu(shim)
    per = 1000 / machines
    return Round(
        wall=wall,
        server_ms=(server_after[0] - server_before[0]) * per,
        shim_ms=(shim_after[0] - shim_before[0]) * per,
        children_ms=(
            server_after[1] - server_before[1] + shim_after[1] - shim_before[1]
        ) * per,
        client_ms=client * per,
    )  # fmt: skip


def _baseline(starts: int) -> float:
    """CPU ms (parent + child) of one ``sh -c true`` started with subprocess."""
    before_self = resource.getrusage(resource.RUSAGE_SELF)
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(starts):
        subprocess.run(["sh", "-c", "true"], check=True)
    after_self = resource.getrusage(resource.RUSAGE_SELF)
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = sum(
        (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        for before, after in ((before_self, after_self), (before_children, after_children))
    )
    return total * 1000 / starts


def measure(label: str, source: Path | None, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="jobrunner-local-bench-") as tmp:
        server = Server(source, Path(tmp))
        try:
            rounds = [
                asyncio.run(_round(server, args.machines, args.concurrency))
                for _ in range(args.rounds)
            ]
        finally:
            server.stop()
    result = {
        "server_ms": statistics.median(r.server_ms for r in rounds),
        "shim_ms": statistics.median(r.shim_ms for r in rounds),
        "children_ms": statistics.median(r.children_ms for r in rounds),
        "client_ms": statistics.median(r.client_ms for r in rounds),
        "machines_per_s": statistics.median(args.machines / r.wall for r in rounds),
    }
    result["backend_ms"] = result["server_ms"] + result["shim_ms"]
    print(
        f"{label:>12}: server {result['server_ms']:.2f} ms + shim {result['shim_ms']:.2f} ms "
        f"= {result['backend_ms']:.2f} ms CPU/machine; children (jobs + launchers) "
        f"{result['children_ms']:.2f} ms; bench client {result['client_ms']:.2f} ms; "
        f"{result['machines_per_s']:.0f} machines/s "
        f"at concurrency {args.concurrency}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--baseline-src",
        action="append",
        default=[],
        metavar="[LABEL=]DIR",
        help="Also measure the code in DIR (repeatable), e.g. the previous commit.",
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    print(
        f"{args.rounds} rounds of {args.machines} `sh -c true` machines at concurrency "
        f"{args.concurrency}; medians",
        flush=True,
    )
    baseline = statistics.median(_baseline(200) for _ in range(args.rounds))
    print(f" baseline: `sh -c true` via subprocess: {baseline:.2f} ms CPU per start", flush=True)
    results: dict[str, dict[str, float] | float] = {"subprocess_ms": baseline}
    for item in args.baseline_src:
        label, _, directory = item.rpartition("=")
        label = label or "before"
        results[label] = measure(label, Path(directory).absolute(), args)
    results["after"] = measure("this code", None, args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
