"""Chaos harness: many short runs under injected API faults and SIGKILLs, then a strict audit.

Everything runs on the local Machines backend in a private ``JOBRUNNER_HOME`` (a temporary
directory, or ``--home``), with a private ledger and a local server on a free port:

* **Runs.** ``--runs`` short jobs (default 1000). Most are enqueued from Python with the public
  API (``JobRunner.enqueue_many``) and consumed by ``--workers`` ``jobrunner worker`` processes;
  a share (``--cli-share``) goes through the CLI, half as ``jobrunner run JOB --json`` and half
  as ``jobrunner run JOB --detach`` (a background driver process). Each run's job is named by
  a token chosen here, and its command appends ``start`` then ``end CODE`` to a marker file on
  the host, ``OUT/TOKEN``, and exits with the CODE the harness chose (some 0, some not).
* **Faults.** The local server gets ``JOBRUNNER_LOCAL_FAULTS`` (429 with Retry-After, 5xx,
  random delays, dropped create responses). It is started only through the normal path (the
  first ``jobrunner`` command or ``jobrunner local start``), so every restart gets them too.
  A ``sitecustomize`` module, put on the ``PYTHONPATH`` of the processes this harness starts,
  wraps the fault middleware *in the server process only* and appends one line per request
  that got a fault to ``faults.log``: that is the count of faults injected, by kind, and of 429
  and 5xx answers the server gave by itself ("self-caused").
* **Kills.** A chaos thread SIGKILLs, at random, detached drivers, workers (a new worker is
  started at once) and the local server (restarted after a moment by ``jobrunner local start``,
  unless a CLI call already did). Once everything is submitted, a **final blow** kills every
  worker, every driver and the server at once, with the last runs in flight.
* **Settling.** Then faults are turned off (``POST /_admin/faults {}``), ``jobrunner runs
  reconcile`` runs alone on what the final blow left, the workers come back, and
  ``reconcile`` runs every 5 s until every run has an outcome or ``--settle-timeout`` passes.
* **Audit.** For each token: the ledger rows with that job name, the markers, the machines
  listed with ``include_deleted`` (grouped by the ``jobrunner_run_id`` and
  ``jobrunner_submit_id`` tags the runner puts in their metadata) and, for a foreground CLI
  run, the command's exit code. A **duplicate** is a job that started more than once, a token
  with more than one ledger run, or an attempt with more than one machine. A **lost** run has
  no outcome after settling, or ran without being in the ledger. A **wrong** outcome is a
  ledger state or exit code that does not match what the job wrote, or a CLI exit code other
  than the job's (74, "the API failed, resume with wait", is allowed). An **orphan** is a
  machine still alive whose run is finished or unknown.

Exit code 1 on any duplicate, lost run or wrong outcome; 0 otherwise. ``--json`` prints the
report as JSON instead of the table. Example::

    .venv/bin/python bench/chaos.py --runs 1000 --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from jobrunner import Job, JobRunner, QueueOptions

APP = "jobrunner-local"
FINISHED = frozenset(
    {"succeeded", "failed", "timed_out", "cancelled", "oom_killed", "lost", "create_failed", "dead"}
)
NOT_ALIVE = frozenset({"stopped", "destroyed", "replaced", "failed"})
EXIT_CODES = (0, 0, 0, 0, 1, 3, 42, 99)
SLEEPS = (0.0, 0.0, 0.1, 0.2, 0.5, 1.0, 2.0)
SCRIPT = (
    'printf "start\\n" >> "$CHAOS_OUT/$RUN_TOKEN"; sleep "$CHAOS_SLEEP"; '
    'printf "end %s\\n" "$CHAOS_EXPECT" >> "$CHAOS_OUT/$RUN_TOKEN"; exit "$CHAOS_EXPECT"'
)

# Loaded by every Python process the harness starts; acts only in `jobrunner.local serve`.
SITECUSTOMIZE = r'''
"""Chaos harness instrumentation: counts the local server's injected faults (bench/chaos.py)."""
import os
import sys


def _chaos_instrument():
    log_path = os.environ.get("CHAOS_FAULT_LOG")
    argv = list(getattr(sys, "orig_argv", ()))
    if not log_path or "jobrunner.local" not in argv or "serve" not in argv:
        return
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def note(line):
        try:
            os.write(fd, (line + "\n").encode())
        except OSError:
            pass

    try:
        import contextvars
        import importlib

        faults = None
        for name in ("jobrunner.local.api.faults", "jobrunner.local.faults"):
            try:
                faults = importlib.import_module(name)
                break
            except ImportError:
                continue
        if faults is None:
            raise ImportError("no fault injection module in jobrunner.local")

        box_var = contextvars.ContextVar("chaos_fault_box", default=None)
        send_json = faults._send_json
        drop_after = faults.FaultMiddleware._drop_after
        call = faults.FaultMiddleware.__call__

        async def counted_send_json(send, status, body, headers):
            box = box_var.get()
            if box is not None:
                box["injected"] = status
            await send_json(send, status, body, headers)

        async def counted_drop_after(self, scope, receive, send):
            box = box_var.get()
            if box is not None:
                box["drop"] = True
            await drop_after(self, scope, receive, send)

        async def counted_call(self, scope, receive, send):
            path = scope.get("path", "")
            if scope.get("type") != "http" or path.startswith(("/healthz", "/_admin")):
                await call(self, scope, receive, send)
                return
            box = {"injected": None, "drop": False, "status": None}
            delayed = bool(self._injector.config.delay)
            token = box_var.set(box)

            async def watch(message):
                if message["type"] == "http.response.start":
                    box["status"] = message["status"]
                await send(message)

            try:
                await call(self, scope, receive, watch)
            finally:
                box_var.reset(token)
                status = box["status"] or 0
                kinds = []
                if delayed:
                    kinds.append("delayed")
                if box["injected"] == 429:
                    kinds.append("rate_limit_429")
                elif box["injected"] is not None:
                    kinds.append("server_error_5xx")
                elif box["drop"] and 200 <= status < 300:
                    kinds.append("dropped_create")
                elif status == 429:
                    kinds.append("self_429")
                elif status >= 500:
                    kinds.append("self_5xx")
                kinds.append("requests")
                note(" ".join(kinds) + " " + scope.get("method", "") + " " + path)

        faults._send_json = counted_send_json
        faults.FaultMiddleware._drop_after = counted_drop_after
        faults.FaultMiddleware.__call__ = counted_call
        note("instrumented pid=%d" % os.getpid())
    except Exception as exc:  # the server must start whatever happens here
        note("instrumentation-failed %r" % (exc,))


_chaos_instrument()
'''


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_server_info(state_dir: Path) -> dict[str, Any] | None:
    """The local server's ``server.json`` (docs/local-backend.md, "State directory")."""
    try:
        info = json.loads((state_dir / "server.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def read_token(state_dir: Path) -> str:
    return (state_dir / "token").read_text().strip()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- the plan ----------------------------------------------------------------------------------


@dataclass
class Planned:
    """One run the harness asks for, and what it learns about it."""

    token: str
    via: str  # "queue", "cli" (jobrunner run --json) or "detach" (jobrunner run --detach)
    code: int
    sleep: float
    submitted: bool = False
    cli_rc: int | None = None
    cli_run_id: str | None = None
    note: str = ""


def make_plan(runs: int, seed: int, cli_share: float) -> list[Planned]:
    rng = random.Random(seed)
    plan = []
    for index in range(runs):
        roll = rng.random()
        via = "queue" if roll >= cli_share else ("cli" if roll < cli_share / 2 else "detach")
        plan.append(
            Planned(
                token=f"chaos-{seed}-{index:05d}",
                via=via,
                code=rng.choice(EXIT_CODES),
                sleep=rng.choice(SLEEPS),
            )
        )
    return plan


def job_env(item: Planned, out: Path) -> dict[str, str]:
    return {
        "RUN_TOKEN": item.token,
        "CHAOS_OUT": str(out),
        "CHAOS_EXPECT": str(item.code),
        "CHAOS_SLEEP": f"{item.sleep:g}",
    }


def job_for(item: Planned, out: Path) -> Job:
    return Job(name=item.token, image="alpine", cmd=["sh", "-c", SCRIPT], env=job_env(item, out))


def job_file(item: Planned, out: Path, folder: Path) -> Path:
    lines = [
        f'name = "{item.token}"',
        'image = "alpine"',
        f"cmd = {json.dumps(['sh', '-c', SCRIPT])}",
        "[env]",
        *(f"{key} = {json.dumps(value)}" for key, value in job_env(item, out).items()),
    ]
    path = folder / f"{item.token}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- the harness -------------------------------------------------------------------------------


@dataclass
class Harness:
    args: argparse.Namespace
    home: Path
    plan: list[Planned]
    harness_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    port: int = field(default_factory=free_port)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_serial: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    events: list[str] = field(default_factory=list)
    stop_chaos: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    detached_ids: list[str] = field(default_factory=list)
    cli_done: int = 0
    engine: sa.Engine | None = None
    pg_name: str | None = None
    url: str = ""
    # This process's environment before setup() adds the harness's settings to it.
    base_env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    # -- paths and environment --

    @property
    def state_dir(self) -> Path:
        return self.home / "local"

    @property
    def out(self) -> Path:
        return self.home / "out"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def faults(self) -> dict[str, Any]:
        a = self.args
        return {
            "rate_limit": a.rate_limit,
            "server_error": a.server_error,
            "delay": a.delay,
            "drop_after_create": a.drop_create,
            "retry_after": 1,
            "seed": a.seed,
        }

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in self.base_env.items()
            if not k.startswith(("FLY_", "JOBRUNNER_", "CHAOS_"))
        }
        path = [str(self.home / "site"), *filter(None, [self.base_env.get("PYTHONPATH")])]
        env.update(
            JOBRUNNER_HOME=str(self.home),
            JOBRUNNER_DATABASE_URL=self.url,
            JOBRUNNER_BACKEND="local",
            JOBRUNNER_LOCAL_PORT=str(self.port),
            JOBRUNNER_LOCAL_FAULTS=json.dumps(self.faults()),
            JOBRUNNER_LOCAL_ADMIN="1",
            JOBRUNNER_LOG_LEVEL="WARNING",
            PYTHONPATH=os.pathsep.join(path),
            PYTHONUNBUFFERED="1",
            CHAOS_FAULT_LOG=str(self.home / "faults.log"),
            CHAOS_HARNESS=self.harness_id,
        )
        return env

    def setup(self) -> None:
        for folder in (
            self.out,
            self.logs,
            self.home / "site",
            self.home / "jobs",
            self.home / "cli",
        ):
            folder.mkdir(parents=True, exist_ok=True)
        (self.home / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        if self.args.database == "postgres":
            import psycopg

            self.pg_name = f"jr_chaos_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(self.args.pg_admin_url, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{self.pg_name}"')
            self.url = f"postgresql://postgres@127.0.0.1:5432/{self.pg_name}"
            engine_url = self.url.replace("postgresql://", "postgresql+psycopg://", 1)
            self.engine = sa.create_engine(engine_url)
        else:
            self.url = f"sqlite:///{self.home}/jobrunner.db"
            self.engine = sa.create_engine(self.url, connect_args={"timeout": 30})
        # This process enqueues through the public API, which may start the local server
        # itself (with this process's environment): give it the same settings as the rest.
        os.environ.update(self.env())
        for item in self.plan:
            if item.via != "queue":
                job_file(item, self.out, self.home / "jobs")

    # -- processes --

    def jobrunner(
        self, args: list[str], name: str, timeout: float
    ) -> subprocess.CompletedProcess[bytes] | None:
        """A jobrunner command with output to logs/NAME.{out,err}; None when it timed out."""
        with (
            open(self.logs / f"{name}.out", "ab") as out,
            open(self.logs / f"{name}.err", "ab") as err,
        ):
            process = subprocess.Popen(
                [sys.executable, "-m", "jobrunner", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env(),
                cwd=self.home,
            )
            try:
                returncode = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                return None
        return subprocess.CompletedProcess(process.args, returncode)

    def start_server(self) -> bool:
        # `local start` takes --port, not JOBRUNNER_LOCAL_PORT (which `run`, `worker` and the
        # Python API use): without it the server would come back on 4280, where the workers
        # started earlier would never find it.
        args = ["local", "start", "--port", str(self.port), "--timeout", "30"]
        done = self.jobrunner(args, "local-start", timeout=60)
        return done is not None and done.returncode == 0

    def server_pid(self) -> int | None:
        info = read_server_info(self.state_dir)
        if not info or not isinstance(info.get("pid"), int):
            return None
        pid = int(info["pid"])
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if b"jobrunner.local" in cmdline and str(self.state_dir).encode() in cmdline:
            return pid
        return None

    def start_worker(self) -> None:
        self.worker_serial += 1
        path = self.logs / f"worker-{self.worker_serial}.log"
        command = [sys.executable, "-m", "jobrunner", "worker"]
        command += ["--concurrency", str(self.args.concurrency), "--grace", "5"]
        command += ["--no-scheduler", "--jobs-dir", str(self.home / "site")]
        with open(path, "ab") as output:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.home,
                start_new_session=True,
            )
        self.workers.append(process)

    def event(self, what: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {what}")

    def live_workers(self) -> list[subprocess.Popen[bytes]]:
        return [w for w in self.workers if w.poll() is None]

    def ensure_workers(self) -> None:
        for _ in range(self.args.workers - len(self.live_workers())):
            self.start_worker()

    def driver_pids(self) -> dict[int, str]:
        """Live `jobrunner runs drive RUN` processes of this harness, by pid."""
        with self.lock:
            wanted = set(self.detached_ids)
        found = {}
        for pid, argv in our_processes(self.harness_id):
            if "drive" in argv and set(argv) & wanted:
                found[pid] = next(a for a in argv if a in wanted)
        return found

    # -- the phases --

    def feed_queue(self, runner: JobRunner) -> None:
        """Enqueue the queued share in chunks, keeping a backlog of about twice the slots.

        Paced by the CLI runs' progress, so that both kinds are in flight all along.
        """
        items = [item for item in self.plan if item.via == "queue"]
        cli_total = sum(item.via != "queue" for item in self.plan)
        backlog = 2 * self.args.workers * self.args.concurrency
        # The last runs wait for the CLI's to end, so the final blow finds them in flight.
        paced, sent = max(1, len(items) - min(backlog, len(items) // 5)), 0
        for item in items[paced:]:
            item.sleep = max(item.sleep, 3.0)  # long enough to be running at the final blow
        while items:
            if sent >= paced:
                ahead = self.cli_done < cli_total
            else:
                ahead = bool(cli_total) and sent / paced > self.cli_done / cli_total + 0.05
            if ahead or self.unfinished(queued_only=True) >= backlog:
                time.sleep(0.2)
                continue
            chunk, items = items[:25], items[25:]
            sent += len(chunk)
            pairs = [
                (job_for(item, self.out), QueueOptions(idempotency_key=item.token))
                for item in chunk
            ]
            for attempt in range(20):
                try:
                    runner.enqueue_many(pairs)
                    break
                except Exception as exc:  # a busy ledger: the idempotency keys make this safe
                    log(f"enqueue failed (try {attempt + 1}), again: {exc}")
                    time.sleep(0.5)
            else:
                for item in chunk:
                    item.note = "enqueue failed"
                continue
            for item in chunk:
                item.submitted = True

    def cli_loop(self, work: queue.Queue[Planned]) -> None:
        while True:
            try:
                item = work.get_nowait()
            except queue.Empty:
                return
            path = self.home / "jobs" / f"{item.token}.toml"
            args = ["run", str(path), "--json"] + (["--detach"] if item.via == "detach" else [])
            done = self.jobrunner(args, f"../cli/{item.token}", timeout=300)
            item.submitted = True
            with self.lock:
                self.cli_done += 1
            if done is None:
                item.note = "the CLI did not return in 300 s (killed)"
                continue
            item.cli_rc = done.returncode
            with contextlib.suppress(OSError, ValueError):
                shown = json.loads((self.home / "cli" / f"{item.token}.out").read_text())
                item.cli_run_id = shown.get("id")
            if item.via == "detach" and item.cli_run_id:
                with self.lock:
                    self.detached_ids.append(item.cli_run_id)

    def chaos_loop(self, rng: random.Random) -> None:
        """SIGKILL drivers, workers and the local server at random until told to stop."""
        last_server_kill = time.monotonic() - self.args.server_gap
        weights = {"driver": 0.45, "worker": 0.35, "server": 0.2}
        first = ["worker", "driver", "server"]  # each kind at least once, early
        while not self.stop_chaos.wait(rng.expovariate(1 / self.args.kill_interval)):
            kind = first.pop(0) if first else rng.choices(list(weights), list(weights.values()))[0]
            if kind == "server" and time.monotonic() - last_server_kill < self.args.server_gap:
                kind = "worker"
            if kind == "driver" and not self.kill_driver(rng) and self.kills["driver"] == 0:
                first.append("driver")  # none alive just now: try again later
            elif kind == "worker":
                self.kill_worker(rng)
            elif kind == "server" and self.kill_server(rng):
                last_server_kill = time.monotonic()

    def kill_driver(self, rng: random.Random) -> bool:
        drivers = self.driver_pids()
        if not drivers:
            return False
        pid = rng.choice(sorted(drivers))
        if not kill(pid):
            return False
        self.kills["driver"] += 1
        self.event(f"killed driver of {drivers[pid]}")
        return True

    def kill_worker(self, rng: random.Random) -> None:
        live = self.live_workers()
        if live:
            victim = rng.choice(live)
            if kill(victim.pid):
                victim.wait()
                self.kills["worker"] += 1
                self.event(f"killed worker {victim.pid}")
        self.ensure_workers()

    def kill_server(self, rng: random.Random) -> bool:
        """SIGKILL the local server; restart it (the normal way) unless a CLI call did."""
        pid = self.server_pid()
        if pid is None or not kill(pid):
            return False
        self.kills["server"] += 1
        self.event(f"killed local server {pid}")
        if not self.stop_chaos.wait(rng.uniform(0.3, 3.0)) and self.server_pid() is None:
            self.kills["server_restarted_by_harness"] += 1
            self.event("restarting the local server: jobrunner local start")
            if not self.start_server():
                log("jobrunner local start failed; the next command will try again")
        return True

    def unfinished(self, *, queued_only: bool = False) -> int:
        assert self.engine is not None
        query = "SELECT count(*) FROM runs WHERE state NOT IN :done"
        if queued_only:
            query += " AND queue IS NOT NULL"
        statement = sa.text(query).bindparams(sa.bindparam("done", expanding=True))
        for _ in range(30):
            try:
                with self.engine.connect() as db:
                    return int(db.execute(statement, {"done": sorted(FINISHED)}).scalar_one())
            except sa.exc.OperationalError:
                time.sleep(0.2)
        raise RuntimeError("the ledger stayed locked for the harness's reads")

    def admin_faults_off(self) -> bool | str:
        """Turn fault injection off (True), or say why it could not be."""
        info = read_server_info(self.state_dir)
        if not info:
            return "no server.json"
        headers = {"Authorization": f"Bearer {read_token(self.state_dir)}"}
        try:
            answer = httpx.post(f"{info['base_url']}/_admin/faults", json={}, headers=headers)
        except httpx.HTTPError as exc:
            return f"{info['base_url']}: {exc!r}"
        return True if answer.status_code == 200 else f"{answer.status_code} {answer.text[:200]}"

    def wait_in_flight(self, wanted: int, timeout: float) -> None:
        """Until ``wanted`` runs are between claimed and finished (or ``timeout`` passes)."""
        assert self.engine is not None
        query = sa.text(
            "SELECT count(*) FROM runs WHERE state IN ('creating', 'starting', 'running')"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.unfinished():
            with contextlib.suppress(sa.exc.OperationalError), self.engine.connect() as db:
                if int(db.execute(query).scalar_one()) >= wanted:
                    return
            time.sleep(0.1)

    def final_blow(self) -> dict[str, int]:
        """SIGKILL every worker, every detached driver and the server, all at once."""
        blow = {"unfinished_runs": self.unfinished()}
        blow["workers"] = sum(kill(worker.pid) for worker in self.live_workers())
        for worker in self.workers:
            worker.wait()
        blow["drivers"] = sum(kill(pid) for pid in self.driver_pids())
        pid = self.server_pid()
        blow["server"] = int(pid is not None and kill(pid))
        if pid is not None:
            wait_gone(pid, timeout=10)
        self.event(f"final blow: {blow}")
        return blow

    def settle(self) -> dict[str, Any]:
        """Let `runs reconcile` and then workers finish every run, within --settle-timeout.

        Reconcile goes first, alone, on what the final blow left; then the workers come back.
        """
        started = time.monotonic()
        deadline = started + self.args.settle_timeout
        if self.server_pid() is None:
            self.start_server()
        faults_off = self.admin_faults_off()
        if faults_off is not True and self.start_server():
            faults_off = self.admin_faults_off()
        first = self.jobrunner(["runs", "reconcile", "--json"], "reconcile-first", timeout=120)
        reconciles: list[int | None] = [None if first is None else first.returncode]
        reconciled: Any = None
        with contextlib.suppress(OSError, ValueError):
            reconciled = len(json.loads((self.logs / "reconcile-first.out").read_text()))
        self.ensure_workers()
        next_reconcile = time.monotonic() + 5
        left = self.unfinished()
        while left and time.monotonic() < deadline:
            if time.monotonic() >= next_reconcile:
                done = self.jobrunner(["runs", "reconcile", "--json"], "reconcile", timeout=120)
                reconciles.append(None if done is None else done.returncode)
                next_reconcile = time.monotonic() + 5
            time.sleep(0.5)
            left = self.unfinished()
        # Detached drivers end once their run's logs are drained: give them a moment.
        drivers_deadline = time.monotonic() + 30
        while self.driver_pids() and time.monotonic() < drivers_deadline:
            time.sleep(0.2)
        return {
            "seconds": round(time.monotonic() - started, 1),
            "unfinished_after": left,
            "faults_turned_off": faults_off,
            "reconcile_exit_codes": reconciles,
            "reconciled_by_first_reconcile": reconciled,
        }

    def list_machines(self) -> list[dict[str, Any]]:
        if self.server_pid() is None:
            self.start_server()
        info = read_server_info(self.state_dir)
        assert info is not None, "no local server to list machines from"
        url = f"{info['base_url']}/v1/apps/{APP}/machines"
        headers = {"Authorization": f"Bearer {read_token(self.state_dir)}"}
        for _ in range(30):  # faults may still be on if they could not be turned off
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.get(
                    url, params={"include_deleted": "true"}, headers=headers, timeout=60
                )
                if answer.status_code == 200:
                    machines: list[dict[str, Any]] = answer.json()
                    return machines
            time.sleep(1)
        raise RuntimeError("could not list the local backend's machines")

    def shutdown(self) -> dict[str, int]:
        """Stop everything this harness started: workers, drivers, server, shim, machines."""
        for worker in self.live_workers():
            worker.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if self.server_pid() is not None or (self.state_dir / "shim.sock").exists():
            self.jobrunner(
                ["local", "stop", "--stop-machines", "--timeout", "30"], "local-stop", 90
            )
        leftovers = 0
        for pid, _ in our_processes(self.harness_id):
            leftovers += kill(pid)
        for pid in processes_under(self.state_dir):
            leftovers += kill(pid)
        if self.engine is not None:
            self.engine.dispose()
        if self.pg_name is not None:
            import psycopg

            with psycopg.connect(self.args.pg_admin_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')
        return {"leftover_processes_killed": leftovers}


# ---- processes ---------------------------------------------------------------------------------


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def wait_gone(pid: int, timeout: float) -> None:
    """Until ``pid`` has exited (and is not a zombie), or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return
        time.sleep(0.05)


def our_processes(harness_id: str) -> list[tuple[int, list[str]]]:
    """Processes (other than this one) whose environment carries this harness's id."""
    marker = f"CHAOS_HARNESS={harness_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            if marker not in environ.split(b"\0"):
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        found.append((int(entry), argv.split("\0")))
    return found


def processes_under(state_dir: Path) -> list[int]:
    """Processes whose working directory is inside the state dir (machines, shim, server)."""
    prefix = str(state_dir.resolve())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/cwd").startswith(prefix):
                found.append(int(entry))
    return found


# ---- the audit ---------------------------------------------------------------------------------


@dataclass
class Markers:
    starts: int = 0
    ends: list[int] = field(default_factory=list)


def read_markers(out: Path) -> dict[str, Markers]:
    found: dict[str, Markers] = {}
    for path in out.iterdir():
        markers = Markers()
        for line in path.read_text(errors="replace").splitlines():
            if line == "start":
                markers.starts += 1
            elif line.startswith("end "):
                markers.ends.append(int(line.split()[1]))
        found[path.name] = markers
    return found


def read_fault_log(path: Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    if not path.exists():
        return {"instrumented_servers": 0}
    for line in path.read_text(errors="replace").splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "instrumented":
            counts["instrumented_servers"] += 1
        elif words[0] == "instrumentation-failed":
            counts["instrumentation_failed"] += 1
        else:
            for word in words:
                if word.startswith("/") or word.isupper():
                    break
                counts[word] += 1
    return dict(counts)


def client_warnings(home: Path) -> dict[str, int]:
    """What the clients (workers, CLI, drivers) logged about the faults they met."""
    counts: Counter[str] = Counter()
    files = [*home.glob("logs/*"), *home.glob("cli/*.err"), *home.glob("drivers/*.log")]
    for path in files:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if "retrying" in line or "polling again" in line or "trying again" in line:
                    counts["retried_calls"] += 1
                    if "HTTP 429" in line:
                        counts["retried_after_429"] += 1
                    elif "HTTP 5" in line:
                        counts["retried_after_5xx"] += 1
                    else:
                        counts["retried_after_connection_error"] += 1
                if "checking for the machine first" in line:
                    counts["ambiguous_creates"] += 1
                if "could not be driven" in line:
                    counts["runs_not_driven_by_a_worker"] += 1
    return dict(counts)


@dataclass
class Verdicts:
    """What the audit found, per kind."""

    duplicate: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    def judge(
        self, item: Planned, rows: list[Any], mark: Markers, machines_per_attempt: list[int]
    ) -> None:
        """One planned run: its ledger rows, the markers its job wrote, its machines."""
        where = f"{item.token} ({item.via}, expected exit {item.code})"
        if len(rows) > 1:
            self.duplicate.append(f"{where}: {len(rows)} ledger runs")
        if mark.starts > 1:
            self.duplicate.append(f"{where}: the job started {mark.starts} times")
        if any(count > 1 for count in machines_per_attempt):
            self.duplicate.append(f"{where}: machines per attempt {machines_per_attempt}")
        if item.via == "cli" and item.cli_rc not in (None, item.code, 74):
            self.wrong.append(f"{where}: `jobrunner run` exited {item.cli_rc}")
        if not rows:
            if mark.starts:
                self.lost.append(f"{where}: the job ran but the ledger has no run")
            elif item.via == "queue" or item.cli_rc == 0:
                self.lost.append(f"{where}: submitted ({item.note or 'ok'}) but no run")
            else:
                self.outcomes["refused"] += 1
                self.not_run.append(f"{where}: refused, exit {item.cli_rc} {item.note}".strip())
            return
        row = rows[0]
        self.outcomes[row.state] += 1
        said = f"run {row.id} {row.state} exit {row.exit_code} ({row.reason}); job wrote {mark}"
        if row.state not in FINISHED:
            self.lost.append(f"{where}: {said}: no outcome after settling")
        elif row.state in ("succeeded", "failed", "dead"):
            expected = ("succeeded",) if item.code == 0 else ("failed", "dead")
            right = row.state in expected and row.exit_code == item.code
            # A job that ran twice is a duplicate already: one of its exits must match.
            wrote = mark.ends == [item.code] or (mark.starts > 1 and item.code in mark.ends)
            if not right or not wrote:
                self.wrong.append(f"{where}: {said}")
        elif row.state in ("lost", "create_failed") and not mark.ends:
            self.not_run.append(f"{where}: {said}")  # an honest outcome: the job never ended
        else:
            self.wrong.append(f"{where}: {said}")


def audit(h: Harness, machines: list[dict[str, Any]]) -> dict[str, Any]:
    assert h.engine is not None
    with h.engine.connect() as db:
        runs = db.execute(
            sa.text("SELECT id, job_name, state, exit_code, reason, attempts, queue FROM runs")
        ).all()
        attempts = db.execute(sa.text("SELECT run_id, number, submit_id FROM attempts")).all()
    runs_by_job: dict[str, list[Any]] = defaultdict(list)
    for row in runs:
        runs_by_job[row.job_name].append(row)
    submit_ids: dict[str, list[str]] = defaultdict(list)
    for attempt in attempts:
        submit_ids[attempt.run_id].append(attempt.submit_id)
    run_state = {row.id: row.state for row in runs}

    # Machines, grouped by the tags the runner puts in their metadata (docs/runs.md).
    per_run_tag: Counter[str] = Counter()
    per_submit_tag: Counter[str] = Counter()
    orphans = []
    for machine in machines:
        metadata = (machine.get("config") or {}).get("metadata") or {}
        run_id = metadata.get("jobrunner_run_id")
        per_run_tag[str(run_id)] += 1
        per_submit_tag[str(metadata.get("jobrunner_submit_id"))] += 1
        alive = machine.get("state") not in NOT_ALIVE
        if alive and (run_id not in run_state or run_state[run_id] in FINISHED):
            orphans.append(
                {"machine": machine.get("id"), "state": machine.get("state"), "run": run_id}
            )
    per_run = Counter(per_run_tag[row.id] for row in runs)
    untagged = per_run_tag["None"]

    verdicts = Verdicts()
    markers = read_markers(h.out)
    for item in h.plan:
        rows = runs_by_job.get(item.token, [])
        counts = [per_submit_tag[s] for row in rows for s in submit_ids[row.id]]
        verdicts.judge(item, rows, markers.get(item.token, Markers()), counts)
    known = {item.token for item in h.plan}
    strangers = [row.id for row in runs if row.job_name not in known]
    if strangers or untagged:
        verdicts.duplicate.append(f"runs of no planned job {strangers[:10]}, {untagged} untagged")
    return {
        "outcomes": dict(verdicts.outcomes),
        "machines": len(machines),
        "machines_per_run": {str(k): v for k, v in sorted(per_run.items())},
        "duplicates": len(verdicts.duplicate),
        "lost": len(verdicts.lost),
        "wrong": len(verdicts.wrong),
        "orphans": len(orphans),
        "not_run": len(verdicts.not_run),
        "details": {
            "duplicate": verdicts.duplicate,
            "lost": verdicts.lost,
            "wrong": verdicts.wrong,
            "orphans": orphans[:20],
            "not_run": verdicts.not_run[:20],
        },
    }


# ---- reporting ---------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    faults = report["faults_injected"]
    client = report["client"]
    rows = [
        ("runs", report["runs"]),
        ("  via queue / run / run --detach", " / ".join(str(v) for v in report["via"].values())),
        ("  outcomes", ", ".join(f"{k} {v}" for k, v in sorted(report["outcomes"].items()))),
        ("faults injected (server)", sum(faults.get(k, 0) for k in FAULT_KINDS)),
        *((f"  {k}", faults.get(k, 0)) for k in FAULT_KINDS),
        (
            f"  requests (all delayed 0..{report['fault_settings']['delay']:g}s)",
            faults.get("requests", 0),
        ),
        ("kills", ", ".join(f"{k} {v}" for k, v in sorted(report["kills"].items())) or "none"),
        (
            "final blow (all killed at once)",
            ", ".join(f"{k} {v}" for k, v in report["settle"]["final_blow"].items())
            + f"; first reconcile finished {report['settle']['reconciled_by_first_reconcile']}",
        ),
        ("machines", report["machines"]),
        ("machines per run", ", ".join(f"{k}: {v}" for k, v in report["machines_per_run"].items())),
        ("duplicates", report["duplicates"]),
        ("lost (no outcome)", report["lost"]),
        ("wrong outcomes", report["wrong"]),
        ("orphan machines", report["orphans"]),
        ("not run, honestly reported", report["not_run"]),
        ("self-caused 429 / 5xx", f"{faults.get('self_429', 0)} / {faults.get('self_5xx', 0)}"),
        (
            "client retries logged (429/5xx/conn)",
            f"{client.get('retried_calls', 0)} ({client.get('retried_after_429', 0)}/"
            f"{client.get('retried_after_5xx', 0)}/"
            f"{client.get('retried_after_connection_error', 0)})",
        ),
        (
            "time: total / chaos / settle",
            f"{report['seconds']['total']} s / {report['seconds']['chaos']} s / "
            f"{report['seconds']['settle']} s",
        ),
        (
            "load average start -> end",
            f"{report['load_average']['start']} -> {report['load_average']['end']}",
        ),
        ("verdict", "PASS" if report["ok"] else "FAIL"),
    ]
    width = max(len(str(k)) for k, _ in rows)
    lines = [f"{str(k).ljust(width)}  {v}" for k, v in rows]
    for kind in ("duplicate", "lost", "wrong"):
        for detail in report["details"][kind][:20]:
            lines.append(f"{kind}: {detail}")
    return "\n".join(lines)


FAULT_KINDS = ("rate_limit_429", "server_error_5xx", "dropped_create")


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    load_start = load_average()
    own_home = args.home is None
    home = Path(tempfile.mkdtemp(prefix="jr-chaos-")) if own_home else Path(args.home).absolute()
    home.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args.runs, args.seed, args.cli_share)
    h = Harness(args=args, home=home, plan=plan)
    report: dict[str, Any] = {"home": str(home)}
    try:
        h.setup()
        log(f"home {home}, port {h.port}, {args.runs} runs, seed {args.seed}")
        if not h.start_server():
            raise RuntimeError(f"the local backend did not start: see {h.logs}")
        for _ in range(args.workers):
            h.start_worker()
        work: queue.Queue[Planned] = queue.Queue()
        for item in plan:
            if item.via != "queue":
                work.put(item)
        chaos = threading.Thread(target=h.chaos_loop, args=(random.Random(args.seed),))
        clis = [
            threading.Thread(target=h.cli_loop, args=(work,)) for _ in range(args.cli_concurrency)
        ]
        with JobRunner.from_env() as runner:
            chaos.start()
            for thread in clis:
                thread.start()
            h.feed_queue(runner)
            for thread in clis:
                thread.join()
        h.stop_chaos.set()
        chaos.join()
        h.wait_in_flight(args.workers * args.concurrency // 2, timeout=10)
        blow = h.final_blow()
        chaos_seconds = time.monotonic() - started
        log(f"everything submitted; chaos over ({dict(h.kills)}); final blow {blow}; settling")
        settle = h.settle()
        settle["final_blow"] = blow
        log(f"settled: {settle}")
        machines = h.list_machines()
        # A machine of a finished run may still be on its way to destroyed: give it a moment.
        orphan_deadline = time.monotonic() + 15
        result = audit(h, machines)
        while result["orphans"] and time.monotonic() < orphan_deadline:
            time.sleep(1)
            result = audit(h, h.list_machines())
        report.update(result)
        report["settle"] = settle
        report["seconds"] = {
            "chaos": round(chaos_seconds, 1),
            "settle": settle["seconds"],
        }
    finally:
        report["shutdown"] = h.shutdown()
        report["faults_injected"] = read_fault_log(home / "faults.log")
        report["client"] = client_warnings(home)
        if own_home and not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    report.update(
        runs=args.runs,
        seed=args.seed,
        via=dict(Counter(item.via for item in plan)),
        fault_settings=h.faults(),
        kills=dict(h.kills),
        events=h.events,
        workers=args.workers,
        concurrency=args.concurrency,
        load_average={"start": load_start, "end": load_average()},
    )
    report["seconds"]["total"] = round(time.monotonic() - started, 1)
    report["ok"] = not (report["duplicates"] or report["lost"] or report["wrong"])
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4, help="jobrunner worker processes")
    parser.add_argument("--concurrency", type=int, default=4, help="--concurrency of each worker")
    parser.add_argument("--cli-share", type=float, default=0.1, help="share of runs via the CLI")
    parser.add_argument("--cli-concurrency", type=int, default=3, help="CLI commands at once")
    parser.add_argument("--rate-limit", type=float, default=0.03, help="share of requests 429")
    parser.add_argument("--server-error", type=float, default=0.03, help="share of requests 503")
    parser.add_argument("--delay", type=float, default=0.05, help="max delay per request (s)")
    parser.add_argument("--drop-create", type=float, default=0.1, help="share of creates dropped")
    parser.add_argument("--kill-interval", type=float, default=3.0, help="mean s between kills")
    parser.add_argument("--server-gap", type=float, default=8.0, help="min s between server kills")
    parser.add_argument("--settle-timeout", type=float, default=120.0)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--home", help="use this JOBRUNNER_HOME (kept) instead of a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--json-out", help="also write the JSON report to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a CI timeout) must still stop every process this harness started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
