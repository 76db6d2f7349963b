"""What the durable queue and ``jobrunner worker`` cost.

Enqueue rate, enqueue-to-create latency, end-to-end throughput, and the worker's footprint with
many runs in flight.

    python bench/worker_bench.py [--database sqlite|postgres|both] [BENCH ...]
    BENCH: enqueue latency throughput inflight profile all   (default: all but profile)

Every benchmark starts from nothing: a temporary JOBRUNNER_HOME, a private local backend on a
free port (``ensure_running(state_dir, port=0)``), and on PostgreSQL a fresh database
``jr_bench_<random>`` created on the ``test`` database and dropped afterwards. Workers are real
``jobrunner worker`` subprocesses (their output goes to ``<home>/worker-*.log``). Everything is
stopped and removed in ``finally``, including job processes left behind.

CPU time is read from ``/proc/<pid>/stat`` (worker; local server plus its descendants, i.e. the
machines' processes; PostgreSQL backends of the bench database) or ``getrusage`` (this process),
as CPU milliseconds per run. Repeated measurements are reported as medians, and each result has a
baseline taken in the same run (raw INSERTs for enqueue, concurrency 1 for throughput), plus a
fixed pure-Python calibration loop so that runs on a busy machine can be compared.

``profile`` runs one extra throughput round (concurrency 16) with the worker under yappi's CPU
clock (every thread; time spent in C counts for the Python function that called it;
``pip install yappi``, or ``pip install --target DIR yappi`` and ``--yappi-path DIR``) and prints
where the worker's CPU goes, in CPU ms per run (inflated by the profiler's own overhead: read
them as shares): self time by package and by function, and inclusive time of jobrunner
functions.
Numbers go into docs/performance.md ("Queue and worker").
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from jobrunner.local.daemon import LocalEndpoint, ensure_running, stop_server
from jobrunner.queue import QueueOptions, run_request
from jobrunner.spec import Job
from jobrunner.states import TERMINAL_STATES
from jobrunner.store import Store
from jobrunner.store.engine import create_store_engine
from jobrunner.wakeup import notify

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
APP = "jobrunner-local"
TICK = os.sysconf("SC_CLK_TCK")
SETTLE_S, STEADY_S = 5.0, 10.0
BENCHES = ("enqueue", "latency", "throughput", "inflight", "profile")
TRUE_JOB = Job(name="bench", image="alpine", cmd=["/bin/sh", "-c", "true"])


# ---- measuring ---------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def self_cpu() -> float:
    """CPU seconds (user + system, all threads) of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    cpu: float  # utime + stime, seconds
    children_cpu: float  # cutime + cstime: children it has reaped
    starttime: int


def proc_stat(pid: int) -> ProcStat | None:
    return proc_stat_path(f"/proc/{pid}/stat")


def proc_stat_path(path: str) -> ProcStat | None:
    try:
        data = Path(path).read_text()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2 :].split()
    return ProcStat(
        pid=int(data.split(" ", 1)[0]),
        ppid=int(rest[1]),
        cpu=(int(rest[11]) + int(rest[12])) / TICK,
        children_cpu=(int(rest[13]) + int(rest[14])) / TICK,
        starttime=int(rest[19]),
    )


def all_procs() -> dict[int, ProcStat]:
    found: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None:
                found[stat.pid] = stat
    return found


def descendants(root: int, procs: dict[int, ProcStat] | None = None) -> list[ProcStat]:
    procs = all_procs() if procs is None else procs
    children: dict[int, list[int]] = {}
    for stat in procs.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    out: list[ProcStat] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(procs[pid])
        todo.extend(children.get(pid, []))
    return out


@dataclass(frozen=True)
class ServerCpu:
    server: float  # the local server process itself
    machines: float  # its descendants (launchers, job processes), live and reaped


def server_cpu(pid: int) -> ServerCpu:
    procs = all_procs()
    own = procs.get(pid)
    if own is None:
        return ServerCpu(float("nan"), float("nan"))
    below = sum(p.cpu + p.children_cpu for p in descendants(pid, procs))
    return ServerCpu(own.cpu, own.children_cpu + below)


def proc_status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def status_mb(status: dict[str, str], key: str) -> float:
    value = status.get(key, "0 kB").split()[0]
    return int(value) / 1024


def calibrate() -> float:
    """CPU ms of a fixed pure-Python workload (median of 5): the machine's speed right now."""
    samples = []
    for _ in range(5):
        began = time.process_time()
        total = 0
        for i in range(300_000):
            total += i % 7
        samples.append((time.process_time() - began) * 1000)
    return median(samples)


class PgCpu:
    """CPU of the PostgreSQL backends serving one database, sampled from /proc.

    Backends that start and end between two samples are missed: call ``sample()`` often during
    long measurements; ``seen`` counts the backends observed (connection churn shows there)."""

    def __init__(self, database: str | None) -> None:
        self.database = database
        self._first: dict[tuple[int, int], float] = {}
        self._last: dict[tuple[int, int], float] = {}
        self._baseline = True
        self._engine = sa.create_engine(
            ADMIN_URL.replace("postgresql://", "postgresql+psycopg://"), poolclass=sa.NullPool
        )

    def sample(self) -> None:
        if self.database is None:
            return
        with self._engine.connect() as db:
            pids = db.execute(
                sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :d"),
                {"d": self.database},
            ).scalars()
            for pid in pids:
                stat = proc_stat(int(pid))
                if stat is None:
                    continue
                key = (stat.pid, stat.starttime)
                # A backend first seen after the window opened started in it: count all its CPU.
                self._first.setdefault(key, stat.cpu if self._baseline else 0.0)
                self._last[key] = stat.cpu

    def reset(self) -> None:
        """Open a new window: the backends alive now are the baseline."""
        self._first.clear()
        self._last.clear()
        self._baseline = True
        self.sample()
        self._baseline = False

    @property
    def total(self) -> float:
        if self.database is None:
            return float("nan")
        return sum(cpu - self._first.get(key, 0.0) for key, cpu in self._last.items())

    @property
    def seen(self) -> int:
        return len(self._last)

    def close(self) -> None:
        self._engine.dispose()


# ---- the environment ---------------------------------------------------------------------------


@dataclass
class Env:
    """One benchmark's private world: home, ledger, local backend, workers."""

    database: str
    home: Path
    url: str
    pg_name: str | None
    store: Store
    endpoint: LocalEndpoint | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    engine: sa.Engine | None = None
    yappi_path: str = ""  # added to sys.path of a profiled worker (pip install --target)

    @property
    def state_dir(self) -> Path:
        return self.home / "local"

    @property
    def reader(self) -> sa.Engine:
        if self.engine is None:
            self.engine = create_store_engine(self.store_url)
        return self.engine

    @property
    def store_url(self) -> str:
        return self.url.replace("postgresql://", "postgresql+psycopg://", 1)

    def notify(self) -> None:
        # Exactly what the Python API does after enqueue_runs committed.
        notify(database_url=self.url, home=self.home)

    def worker_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FLY_", "JOBRUNNER_")) or k == "JOBRUNNER_LOCAL_TOKEN"
        }
        env.update(
            JOBRUNNER_HOME=str(self.home),
            JOBRUNNER_DATABASE_URL=self.url,
            JOBRUNNER_BACKEND="local",
        )
        return env

    def start_worker(
        self, concurrency: int, tag: str, *, profile: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log_path = self.home / f"worker-{tag}.log"
        command = [sys.executable, "-m", "jobrunner"]
        if profile is not None:
            command = [sys.executable, "-c", PROFILED_WORKER, str(profile), self.yappi_path]
        command += ["worker", "--concurrency", str(concurrency), "--grace", "0"]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.worker_env(),
                cwd=self.home,
            )
        self.workers.append(process)
        deadline = time.monotonic() + 60
        while b"serving" not in log_path.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker did not start (exit {process.poll()}):\n{tail}")
            time.sleep(0.02)
        time.sleep(0.3)  # let its first (empty) claim pass: measure an idle worker
        return process

    def stop_worker(self, process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ValueError):
            self.workers.remove(process)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def enqueue(self, job: Job, count: int) -> list[str]:
        request = run_request(job, QueueOptions(), backend="local", app=APP)
        rows = self.store.enqueue_runs([request] * count)
        self.notify()
        return [run.id for run, _ in rows]

    def count_states(self) -> Counter[str]:
        query = "SELECT state, count(*) FROM runs GROUP BY state"
        with self.reader.connect() as db:
            return Counter({s: int(n) for s, n in db.execute(sa.text(query))})

    def check_workers(self) -> None:
        """Give up early when a worker died or keeps failing to drive runs (an engine bug)."""
        for log in self.home.glob("worker-*.log"):
            text = log.read_text(errors="replace")
            failures = [line for line in text.splitlines() if "could not be driven" in line]
            if len(failures) >= 20:
                raise RuntimeError(f"the worker keeps failing ({log}):\n{failures[0]}")
        for process in self.workers:
            if process.returncode is None and process.poll() is not None:
                raise RuntimeError(f"a worker exited with code {process.returncode}")

    def finished_count(self) -> int:
        states = self.count_states()
        return sum(states[s] for s in TERMINAL_STATES)

    def wait_finished(
        self,
        total: int,
        timeout: float,
        tick: Callable[[], None] | None = None,
        poll: float = 0.1,
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = self.count_states()
            if sum(states[s] for s in TERMINAL_STATES) >= total:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"runs not finished after {timeout:.0f}s: {dict(states)}")
            self.check_workers()
            if tick is not None:
                tick()
            time.sleep(poll)


@contextlib.contextmanager
def bench_env(database: str, *, backend: bool = True) -> Iterator[Env]:
    home = Path(tempfile.mkdtemp(prefix="jr-bench-"))
    pg_name: str | None = None
    env: Env | None = None
    try:
        if database == "postgres":
            import psycopg

            pg_name = f"jr_bench_{secrets.token_hex(4)}"
            with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{pg_name}"')
            url = f"postgresql://postgres@127.0.0.1:5432/{pg_name}"
        else:
            url = f"sqlite:///{home}/jobrunner.db"
        env = Env(database=database, home=home, url=url, pg_name=pg_name, store=Store(url))
        if backend:
            env.endpoint = ensure_running(env.state_dir, port=0)
        yield env
    finally:
        if env is not None:
            for process in list(env.workers):
                env.stop_worker(process)
            if env.endpoint is not None:
                stop_server(env.state_dir, timeout=60)
            kill_leftovers(home)
            env.store.close()
            if env.engine is not None:
                env.engine.dispose()
        if pg_name is not None:
            import psycopg

            with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        shutil.rmtree(home, ignore_errors=True)


def processes_under(home: Path) -> list[int]:
    """Processes whose working directory is inside ``home`` (the machines' scratch dirs)."""
    prefix = str(home.resolve())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/cwd").startswith(prefix + "/local"):
                found.append(int(entry))
    return found


def kill_leftovers(home: Path) -> int:
    pids = processes_under(home)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


# ---- 1. enqueue --------------------------------------------------------------------------------


def bench_enqueue(database: str, n: int, repeat: int) -> dict[str, Any]:
    with bench_env(database, backend=False) as env:
        pg = PgCpu(env.pg_name)
        request = run_request(TRUE_JOB, QueueOptions(), backend="local", app=APP)
        payload = json.dumps(request.job_snapshot)
        raw = create_store_engine(env.store_url)
        with raw.begin() as db:
            db.execute(sa.text("CREATE TABLE bench_raw (id VARCHAR(32) PRIMARY KEY, body TEXT)"))
        insert = sa.text("INSERT INTO bench_raw (id, body) VALUES (:id, :body)")

        def one_by_one() -> None:
            for _ in range(n):
                env.store.enqueue_runs([request])

        def batched() -> None:
            for _ in range(n // 100):
                env.store.enqueue_runs([request] * 100)

        def raw_one() -> None:
            for _ in range(n):
                with raw.begin() as db:
                    db.execute(insert, {"id": secrets.token_hex(8), "body": payload})

        def raw_batched() -> None:
            for _ in range(n // 100):
                rows = [{"id": secrets.token_hex(8), "body": payload} for _ in range(100)]
                with raw.begin() as db:
                    db.execute(insert, rows)

        modes: dict[str, Callable[[], None]] = {
            "one": one_by_one,
            "batch100": batched,
            "raw_one": raw_one,
            "raw_batch100": raw_batched,
        }
        samples: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
        try:
            for _ in range(repeat):  # interleaved, so a busy moment hits every mode alike
                for mode, fn in modes.items():
                    count = n if mode.endswith("one") else (n // 100) * 100
                    pg.reset()
                    wall0, cpu0 = time.perf_counter(), self_cpu()
                    fn()
                    wall, cpu = time.perf_counter() - wall0, self_cpu() - cpu0
                    pg.sample()
                    samples[mode].append(
                        (count / wall, cpu / count * 1000, pg.total / count * 1000)
                    )
        finally:
            raw.dispose()
            pg.close()
        result: dict[str, Any] = {"n": n, "repeat": repeat}
        for mode, values in samples.items():
            result[mode] = {
                "runs_per_s": median([v[0] for v in values]),
                "cpu_ms_per_run": median([v[1] for v in values]),
                "db_server_cpu_ms_per_run": median([v[2] for v in values]),
            }
        for mode in ("one", "batch100"):
            base = result[f"raw_{mode}"]
            result[mode]["cpu_vs_raw"] = result[mode]["cpu_ms_per_run"] / base["cpu_ms_per_run"]
            result[mode]["rate_vs_raw"] = result[mode]["runs_per_s"] / base["runs_per_s"]
        return result


# ---- 2. enqueue-to-create latency --------------------------------------------------------------


def transition_times(env: Env, ids: list[str]) -> dict[str, dict[str, datetime]]:
    """Per run: the time each state was first entered (``at`` of its transition row)."""
    out: dict[str, dict[str, datetime]] = {run_id: {} for run_id in ids}
    for run_id in ids:
        for transition in env.store.transitions(run_id):
            out[run_id].setdefault(transition.to_state, transition.at)
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": median(values), "p95": percentile(values, 0.95), "max": max(values)}


def bench_latency(
    database: str, samples: int, spacing: float, serial: int, concurrency: int
) -> dict[str, Any]:
    """``samples`` runs enqueued ``spacing`` s apart (earlier runs are still in flight), then
    ``serial`` runs each enqueued once the one before has finished (the worker is idle)."""
    with bench_env(database) as env:
        env.start_worker(concurrency, "latency")
        request = run_request(TRUE_JOB, QueueOptions(), backend="local", app=APP)
        result: dict[str, Any] = {"concurrency": concurrency, "spacing_ms": spacing * 1000}
        for mode, count in (("spaced", samples), ("serial", serial)):
            committed: dict[str, float] = {}
            enqueue_ms: list[float] = []
            done = env.finished_count()  # runs of the previous mode
            next_at = time.perf_counter()
            for _ in range(count):
                began = time.perf_counter()
                [(run, _created)] = env.store.enqueue_runs([request])
                committed[run.id] = time.time()  # the commit has returned
                enqueue_ms.append((time.perf_counter() - began) * 1000)
                env.notify()
                if mode == "spaced":
                    next_at += spacing
                    time.sleep(max(0.0, next_at - time.perf_counter()))
                else:
                    done += 1
                    env.wait_finished(done, timeout=60, poll=0.01)
                    time.sleep(0.1)
            env.wait_finished(done if mode == "serial" else done + count, timeout=120)
            times = transition_times(env, list(committed))
            result[mode] = {
                "samples": count,
                "enqueue_ms": summary(enqueue_ms),
                "to_creating_ms": summary(
                    [(times[r]["creating"].timestamp() - t) * 1000 for r, t in committed.items()]
                ),
                "to_starting_ms": summary(
                    [(times[r]["starting"].timestamp() - t) * 1000 for r, t in committed.items()]
                ),
            }
        return result


# ---- 3. end-to-end throughput ------------------------------------------------------------------


def main_thread_cpu(pid: int) -> float:
    """CPU seconds of the process's main thread (the worker's event loop)."""
    stat = proc_stat_path(f"/proc/{pid}/task/{pid}/stat")
    return stat.cpu if stat is not None else float("nan")


def one_round(
    env: Env, concurrency: int, n: int, tag: str, *, profile: Path | None = None
) -> dict[str, Any]:
    """Start a worker, enqueue ``n`` trivial runs in one batch, wait until all are finished."""
    assert env.endpoint is not None
    worker = env.start_worker(concurrency, tag, profile=profile)
    pg = PgCpu(env.pg_name)
    try:
        pg.reset()
        done_before = env.finished_count()
        if profile is not None:
            worker.send_signal(signal.SIGUSR1)  # start profiling
        worker0, main0 = proc_stat(worker.pid), main_thread_cpu(worker.pid)
        server0 = server_cpu(env.endpoint.pid)
        began = time.time()
        ids = env.enqueue(TRUE_JOB, n)
        committed = time.time()
        last_sample = [time.monotonic()]

        def tick() -> None:
            if time.monotonic() - last_sample[0] > 0.5:
                pg.sample()
                last_sample[0] = time.monotonic()

        env.wait_finished(done_before + n, timeout=600, tick=tick)
        # Read just before stopping it.
        worker1, main1 = proc_stat(worker.pid), main_thread_cpu(worker.pid)
        server1 = server_cpu(env.endpoint.pid)
        pg.sample()
        if profile is not None:
            worker.send_signal(signal.SIGUSR2)  # stop profiling, write the stats
            deadline = time.monotonic() + 60
            while not profile.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
    finally:
        env.stop_worker(worker)
        pg.close()
    assert worker0 is not None and worker1 is not None
    runs = [env.store.get_run(run_id) for run_id in ids]
    finished = [r.finished_at.timestamp() for r in runs if r.finished_at is not None]
    wall = max(finished) - began
    states = Counter(r.state for r in runs)
    worker_ms = (worker1.cpu - worker0.cpu) / n * 1000
    main_ms = (main1 - main0) / n * 1000
    return {
        "concurrency": concurrency,
        "n": n,
        "jobs_per_s": n / wall,
        "wall_s": wall,
        "succeeded": states["succeeded"],
        "worker_cpu_ms_per_run": worker_ms,
        "worker_loop_thread_ms_per_run": main_ms,
        "worker_other_threads_ms_per_run": worker_ms - main_ms,
        "server_cpu_ms_per_run": (server1.server - server0.server) / n * 1000,
        "machines_cpu_ms_per_run": (server1.machines - server0.machines) / n * 1000,
        "db_server_cpu_ms_per_run": pg.total / n * 1000,
        "db_backends_seen": pg.seen if env.pg_name else None,
        "latency_to_finished_ms_p50": median([(t - committed) * 1000 for t in finished]),
    }


def bench_throughput(
    database: str, levels: list[int], n: int, n_serial: int, repeat: int
) -> dict[str, Any]:
    rounds: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
    with bench_env(database) as env:
        for r in range(repeat):
            for c in levels:
                count = n_serial if c == 1 else n
                rounds[c].append(one_round(env, c, count, f"c{c}-{r}"))
                print(f"  {database} c={c} round {r}: {brief(rounds[c][-1])}", flush=True)
    keys = [
        "jobs_per_s", "worker_cpu_ms_per_run", "worker_loop_thread_ms_per_run",
        "worker_other_threads_ms_per_run", "server_cpu_ms_per_run",
        "machines_cpu_ms_per_run", "db_server_cpu_ms_per_run", "latency_to_finished_ms_p50",
    ]  # fmt: skip
    result: dict[str, Any] = {"repeat": repeat, "levels": {}}
    for c, values in rounds.items():
        result["levels"][c] = {k: median([v[k] for v in values]) for k in keys}
        result["levels"][c]["n"] = values[0]["n"]
        result["levels"][c]["succeeded"] = min(v["succeeded"] for v in values)
    if 1 in result["levels"]:
        base = result["levels"][1]["jobs_per_s"]
        for c in result["levels"]:
            result["levels"][c]["vs_c1"] = result["levels"][c]["jobs_per_s"] / base
    return result


def brief(r: dict[str, Any]) -> str:
    return (
        f"{r['jobs_per_s']:.1f} jobs/s, worker {r['worker_cpu_ms_per_run']:.1f} ms/run, "
        f"server {r['server_cpu_ms_per_run']:.1f}, machines {r['machines_cpu_ms_per_run']:.1f}, "
        f"db {r['db_server_cpu_ms_per_run']:.1f}, p50 {r['latency_to_finished_ms_p50']:.0f} ms"
    )


# ---- 4. many runs in flight --------------------------------------------------------------------


def bench_inflight(database: str, count: int, sleep_s: int, ramp_timeout: float) -> dict[str, Any]:
    job = Job(name="bench-sleep", image="alpine", cmd=["sleep", str(sleep_s)])
    with bench_env(database) as env:
        assert env.endpoint is not None
        worker = env.start_worker(count, "inflight")
        idle = proc_status(worker.pid)
        began = time.monotonic()
        cpu0 = proc_stat(worker.pid)
        env.enqueue(job, count)
        peak_in_flight, peak_threads, reached_at = 0, 0, None
        deadline = began + ramp_timeout
        while time.monotonic() < deadline:
            states = env.count_states()
            in_flight = states["running"] + states["starting"]
            peak_threads = max(peak_threads, int(proc_status(worker.pid).get("Threads", 0)))
            if in_flight > peak_in_flight:
                peak_in_flight = in_flight
            if in_flight >= count:
                reached_at = time.monotonic() - began
                break
            if sum(states[s] for s in TERMINAL_STATES):
                break  # the first sleeps ended before the last started: that is the peak
            time.sleep(0.5)
        status = proc_status(worker.pid)
        cpu1 = proc_stat(worker.pid)
        # What holding them costs: the worker's CPU over some seconds, once the ramp settled.
        time.sleep(SETTLE_S)
        cpu_settled = proc_stat(worker.pid)
        time.sleep(STEADY_S)
        cpu2 = proc_stat(worker.pid)
        server = proc_status(env.endpoint.pid)
        jobs = [p for p in descendants(env.endpoint.pid) if p.pid]
        sleeping = [p for p in jobs if b"sleep" in _cmdline(p.pid)]
        # Stop: the worker releases its runs (--grace 0), the server stops its machines.
        stop_began = time.monotonic()
        env.stop_worker(worker)
        stop_server(env.state_dir, timeout=60)
        env.endpoint = None
        stop_s = time.monotonic() - stop_began
        survivors = [
            p
            for p in sleeping
            if (s := proc_stat(p.pid)) is not None and s.starttime == p.starttime
        ]
        for p in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        leftovers = kill_leftovers(env.home)
        assert cpu0 is not None and cpu1 is not None and cpu2 is not None
        assert cpu_settled is not None
        return {
            "target": count,
            "sleep_s": sleep_s,
            "peak_in_flight": peak_in_flight,
            "seconds_to_reach": reached_at,
            "job_processes": len(sleeping),
            "worker_rss_mb": status_mb(status, "VmRSS"),
            "worker_hwm_mb": status_mb(status, "VmHWM"),
            "worker_idle_rss_mb": status_mb(idle, "VmRSS"),
            "worker_threads": int(status.get("Threads", 0)),
            "worker_peak_threads": peak_threads,
            "worker_cpu_ms_per_run_ramp": (cpu1.cpu - cpu0.cpu) / max(1, peak_in_flight) * 1000,
            "worker_cpu_pct_holding": (cpu2.cpu - cpu_settled.cpu) / STEADY_S * 100,
            "server_rss_mb": status_mb(server, "VmRSS"),
            "server_threads": int(server.get("Threads", 0)),
            "stop_s": stop_s,
            "left_behind_killed": len(survivors) + leftovers,
            # Every `sleep N` on the machine after clean-up (other users' included).
            "sleep_processes_after": len(pgrep_exact(["sleep", str(sleep_s)])),
        }


def pgrep_exact(argv: list[str]) -> list[int]:
    wanted = "\0".join(argv).encode() + b"\0"
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmdline(int(p)) == wanted]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# ---- profile -----------------------------------------------------------------------------------

# Runs ``jobrunner worker`` under yappi (CPU clock: per-thread CPU time, every thread, C calls
# included). SIGUSR1 starts profiling, SIGUSR2 stops it and writes pstats to argv[1].
PROFILED_WORKER = """
import signal, sys
out, extra = sys.argv[1], sys.argv[2]
if extra:
    sys.path.insert(0, extra)
import yappi
yappi.set_clock_type("cpu")
def start(*_):
    yappi.clear_stats()
    yappi.start(builtins=False, profile_threads=True)
def stop(*_):
    yappi.stop()
    yappi.get_func_stats().save(out + ".tmp", type="pstat")
    import os
    os.replace(out + ".tmp", out)
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
sys.argv = ["jobrunner", *sys.argv[3:]]
from jobrunner.cli import main
main()
"""

_PACKAGES = (
    "sqlalchemy", "psycopg", "sqlite3", "aiohttp", "httpx", "httpcore", "anyio", "asyncio",
    "pydantic", "pydantic_core", "rich", "jobrunner", "yarl", "multidict", "json", "threading",
    "concurrent", "selectors", "logging", "datetime", "typing", "dataclasses", "enum", "queue",
    "contextlib", "socket", "ssl", "functools", "uuid", "re", "weakref", "abc",
)  # fmt: skip


def package_of(path: str, func: str) -> str:
    if path in ("~", "builtins") or func.startswith(
        "<"
    ):  # a C function: '<method 'execute' of 'sqlite3.Cursor' objects>'
        found = re.search(r"of '([\w.]+?)\.\w+' objects", func)
        owner = found.group(1) if found else func.strip("<>").split(".")[0].split(" ")[-1]
        return f"C: {owner}"
    parts = re.split(r"[/\\]", path)
    for part in reversed(parts[:-1]):
        if part in _PACKAGES:
            return part
    stem = Path(path).stem
    return stem if stem in _PACKAGES else f"<{stem}>"


def read_profile(path: Path) -> tuple[Counter[str], Counter[str], Counter[str], float]:
    """From yappi's pstats: self CPU by package, self CPU by function, inclusive CPU of the
    jobrunner functions, and the total CPU profiled (seconds)."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    by_package: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0.0
    for (file, line, func), (_cc, _nc, tottime, cumtime, _callers) in stats.items():
        total += tottime
        package = package_of(file, func)
        by_package[package] += tottime
        short = file.split("site-packages/")[-1].split("lib/python3.11/")[-1]
        by_function[f"{short}:{line} {func}"] += tottime
        if "/jobrunner/" in file and "/site-packages/" not in file:
            name = f"{file.split('/jobrunner/')[-1]}:{func}"
            inclusive[name] = max(inclusive[name], cumtime)
    return by_package, by_function, inclusive, total


def bench_profile(
    database: str, n: int, concurrency: int, yappi_path: str, keep: Path | None
) -> dict[str, Any]:
    with bench_env(database) as env:
        env.yappi_path = yappi_path
        stats_path = env.home / "worker.pstats"
        measured = one_round(env, concurrency, n, "profile", profile=stats_path)
        by_package, by_function, inclusive, total = read_profile(stats_path)
        if keep is not None:
            shutil.copyfile(stats_path, keep.with_suffix(f".{database}.pstats"))

    def per_run(counter: Counter[str], top: int) -> dict[str, float]:
        return {k: round(v / n * 1000, 2) for k, v in counter.most_common(top)}

    return {
        "round": measured,
        "profiled_cpu_ms_per_run": total / n * 1000,
        "self_by_package_ms_per_run": per_run(by_package, 16),
        "self_by_function_ms_per_run": per_run(by_function, 25),
        "inclusive_jobrunner_ms_per_run": per_run(inclusive, 40),
    }


def engine_fingerprint() -> str:
    """The commit plus a hash of the jobrunner sources as they are (the tree may be edited)."""
    package = Path(__file__).resolve().parent.parent / "jobrunner"
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.read_bytes())
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True, text=True
    ).stdout.strip()
    return f"{head or '?'}+{digest.hexdigest()[:10]}"


def yappi_found(extra: str) -> bool:
    code = f"import sys; sys.path.insert(0, {extra!r}); import yappi"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# ---- main --------------------------------------------------------------------------------------


def show(name: str, result: Any, results: dict[str, Any], path: Path | None) -> None:
    print(f"== {name}")
    print(json.dumps(result, indent=1, default=str), flush=True)
    if path is not None:  # after every benchmark, so a failure later loses nothing
        path.write_text(json.dumps(results, indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benches", nargs="*", default=["all"], help=f"{', '.join(BENCHES)}, all")
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--enqueue-n", type=int, default=2000)
    parser.add_argument("--enqueue-repeat", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=100)
    parser.add_argument("--latency-spacing", type=float, default=0.05, help="seconds")
    parser.add_argument("--latency-serial", type=int, default=30, help="samples, worker idle")
    parser.add_argument("--concurrency", default="1,16,64", help="throughput levels")
    parser.add_argument("--runs", type=int, default=200, help="throughput runs per round")
    parser.add_argument("--runs-serial", type=int, default=60, help="runs at concurrency 1")
    parser.add_argument("--repeat", type=int, default=2, help="throughput rounds per level")
    parser.add_argument("--inflight", type=int, default=1000)
    parser.add_argument(
        "--sleep", type=int, default=120, help="seconds each in-flight job sleeps (> ramp time)"
    )
    parser.add_argument(
        "--yappi-path", default="", help="folder holding yappi (pip install --target DIR yappi)"
    )
    parser.add_argument("--keep-profile", type=Path, help="copy the worker's pstats file here")
    parser.add_argument("--json", type=Path, help="also write every result here")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every benchmark's finally stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    benches = set(args.benches)
    unknown = benches - {*BENCHES, "all"}
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {BENCHES} or all")
    if "all" in benches:
        benches = (benches - {"all"}) | {"enqueue", "latency", "throughput", "inflight"}
    databases = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "engine": engine_fingerprint(),
        "calibration_cpu_ms": calibrate(),
        "loadavg": os.getloadavg(),
    }
    print(
        f"engine {results['engine']}; calibration loop {results['calibration_cpu_ms']:.1f} CPU ms",
        flush=True,
    )
    levels = [int(c) for c in args.concurrency.split(",")]
    for database in databases:
        out = results.setdefault(database, {})
        if "enqueue" in benches:
            out["enqueue"] = bench_enqueue(database, args.enqueue_n, args.enqueue_repeat)
            show(f"{database} enqueue", out["enqueue"], results, args.json)
        if "latency" in benches:
            out["latency"] = bench_latency(
                database,
                args.latency_samples,
                args.latency_spacing,
                args.latency_serial,
                concurrency=16,
            )
            show(f"{database} latency", out["latency"], results, args.json)
        if "throughput" in benches:
            out["throughput"] = bench_throughput(
                database, levels, args.runs, args.runs_serial, args.repeat
            )
            show(f"{database} throughput", out["throughput"], results, args.json)
        if "inflight" in benches:
            out["inflight"] = bench_inflight(database, args.inflight, args.sleep, args.sleep + 30)
            show(f"{database} inflight", out["inflight"], results, args.json)
        if "profile" in benches:
            if not yappi_found(args.yappi_path):
                sys.exit("profile needs yappi: pip install yappi, or --yappi-path DIR")
            out["profile"] = bench_profile(
                database, args.runs, 16, args.yappi_path, args.keep_profile
            )
            show(f"{database} profile", out["profile"], results, args.json)
    results["calibration_cpu_ms_end"] = calibrate()
    show("calibration at the end (CPU ms)", results["calibration_cpu_ms_end"], results, args.json)


if __name__ == "__main__":
    main()
