"""Three `jobrunner scheduler` processes deciding one folder of per-second schedules together.

Every process reads the same job files and computes the same ticks; the ledger's unique
(schedule, scheduled_for) key lets exactly one of them decide each tick. After the processes ran
for a while (on PostgreSQL, and on one SQLite file shared by processes of one host), the ledger
must hold, for every schedule, each tick between its first and last decided tick exactly once,
fired, with its own queued run; and the runs table exactly those runs.

No worker runs the queued runs (`concurrency = "allow"`, so nothing is skipped for overlap), and
`catch_up = "all"` so that a tick decided late on a loaded machine still fires. Every wait is a
condition with a generous bound, never a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO

import pytest
import sqlalchemy as sa

from jobrunner.cron import CronSchedule
from jobrunner.store import Store
from tests.conftest import _require_postgres, fresh_postgres_database

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
PROCESSES = 3
# name -> seconds between ticks (every period divides 60, so the ticks are evenly spaced).
PERIODS = {"every1": 1, "every2": 2, "every3": 3, "every4": 4, "every5": 5}
START_BOUND = 60.0  # seconds for the processes to start and decide their first ticks
STOP_BOUND = 20.0  # seconds for a process to exit after SIGTERM (then SIGKILL)


def expression(period: int) -> str:
    return "* * * * * *" if period == 1 else f"*/{period} * * * * *"


def write_jobs(folder: Path) -> None:
    folder.mkdir()
    for name, period in PERIODS.items():
        (folder / f"{name}.toml").write_text(
            f'name = "{name}"\n'
            'image = "alpine"\n'
            'cmd = ["true"]\n'
            f'schedule = "{expression(period)}"\n'
            'concurrency = "allow"\n'
            'catch_up = "all"\n'
        )


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.25)


@dataclass
class Schedulers:
    """``jobrunner scheduler`` processes on one folder and one ledger."""

    database_url: str
    home: Path
    jobs_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    files: list[IO[bytes]] = field(default_factory=list)

    def start(self, count: int) -> None:
        env = {
            **os.environ,
            "JOBRUNNER_DATABASE_URL": self.database_url,
            "JOBRUNNER_HOME": str(self.home),
            "JOBRUNNER_BACKEND": "local",
            "PYTHONUNBUFFERED": "1",
        }
        command = [sys.executable, "-m", "jobrunner", "scheduler", "--jobs-dir"]
        for index in range(count):
            output = self.home / f"scheduler-{index}.log"
            handle = output.open("wb")
            self.outputs.append(output)
            self.files.append(handle)
            self.procs.append(
                subprocess.Popen(
                    [*command, str(self.jobs_dir)],
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                )
            )

    def check_alive(self) -> None:
        for index, process in enumerate(self.procs):
            if process.poll() is not None:
                raise AssertionError(
                    f"scheduler {index} exited with {process.returncode}:\n{self.diagnostics()}"
                )

    def stop(self) -> list[int | None]:
        """SIGTERM every process, wait, SIGKILL what is left; their exit codes."""
        for process in self.procs:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for process in self.procs:
            try:
                codes.append(process.wait(timeout=STOP_BOUND))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_BOUND)
                codes.append(None)
        for handle in self.files:
            handle.close()
        return codes

    def diagnostics(self) -> str:
        parts = []
        for index, output in enumerate(self.outputs):
            text = output.read_text(errors="replace") if output.exists() else ""
            parts.append(f"--- scheduler {index} ---\n{text[-3000:]}")
        return "\n".join(parts)


@contextmanager
def running_schedulers(database_url: str, tmp_path: Path) -> Iterator[Schedulers]:
    home = tmp_path / "home"
    home.mkdir()
    jobs_dir = tmp_path / "jobs"
    write_jobs(jobs_dir)
    schedulers = Schedulers(database_url, home, jobs_dir)
    try:
        schedulers.start(PROCESSES)
        yield schedulers
    finally:
        schedulers.stop()


def fired_ticks(store: Store) -> dict[str, list[datetime]]:
    """Each schedule's decided ticks, oldest first."""
    found: dict[str, list[datetime]] = {name: [] for name in PERIODS}
    for fire in sorted(store.list_fires(limit=1_000_000), key=lambda f: f.scheduled_for):
        found.setdefault(fire.schedule, []).append(fire.scheduled_for)
    return found


def spans(store: Store) -> dict[str, float]:
    return {
        name: (ticks[-1] - ticks[0]).total_seconds() if ticks else -1.0
        for name, ticks in fired_ticks(store).items()
    }


def run_and_check(database_url: str, tmp_path: Path, seconds: int) -> None:
    store = Store(database_url)
    try:
        with running_schedulers(database_url, tmp_path) as schedulers:

            def decided(span: float) -> Callable[[], bool]:
                def check() -> bool:
                    schedulers.check_alive()
                    return all(
                        spans(store)[name] >= span - period for name, period in PERIODS.items()
                    )

                return check

            until(decided(0), START_BOUND, f"first ticks decided\n{schedulers.diagnostics()}")
            until(
                decided(seconds),
                seconds * 4 + START_BOUND,
                f"{seconds} s of ticks decided: {spans(store)}\n{schedulers.diagnostics()}",
            )
            schedulers.check_alive()
            for index, output in enumerate(schedulers.outputs):
                text = output.read_text(errors="replace")
                assert f"deciding {len(PERIODS)} cron schedule(s)" in text, (index, text)
            codes = schedulers.stop()
            assert codes == [0] * PROCESSES, f"{codes}\n{schedulers.diagnostics()}"
        check_ledger(store, database_url, seconds)
    finally:
        store.close()


def check_ledger(store: Store, database_url: str, seconds: int) -> None:
    fires = sa.table(
        "schedule_fires",
        sa.column("schedule"),
        sa.column("scheduled_for"),
        sa.column("decision"),
        sa.column("run_id"),
    )
    runs = sa.table("runs", sa.column("id"), sa.column("job_name"), sa.column("trigger"))
    transitions = sa.table("run_transitions", sa.column("run_id"), sa.column("to_state"))
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as db:
            doubled = db.execute(
                sa.select(fires.c.schedule, fires.c.scheduled_for, sa.func.count())
                .group_by(fires.c.schedule, fires.c.scheduled_for)
                .having(sa.func.count() > 1)
            ).all()
            rows = db.execute(sa.select(fires.c.schedule, fires.c.decision, fires.c.run_id)).all()
            run_rows = db.execute(sa.select(runs.c.id, runs.c.job_name, runs.c.trigger)).all()
            created: dict[str, int] = dict(
                db.execute(
                    sa.select(transitions.c.run_id, sa.func.count())
                    .where(transitions.c.to_state == "pending")
                    .group_by(transitions.c.run_id)
                ).all()
            )
    finally:
        engine.dispose()

    assert not doubled, f"ticks decided more than once: {doubled[:10]}"
    not_fired = [r for r in rows if r.decision != "fired" or r.run_id is None]
    assert not not_fired, f"{len(not_fired)} ticks not fired, e.g. {not_fired[:5]}"
    run_ids = [r.run_id for r in rows]
    assert len(set(run_ids)) == len(run_ids), "two fires share a run"

    for name, ticks in fired_ticks(store).items():
        period = PERIODS[name]
        cron = CronSchedule.parse(expression(period))
        expected = [t.scheduled_for for t in cron.ticks(ticks[0] - timedelta(seconds=1), ticks[-1])]
        missing = sorted(set(expected) - set(ticks))
        extra = sorted(set(ticks) - set(expected))
        assert not missing and not extra, (name, missing[:5], extra[:5])
        assert ticks == expected, name
        assert (ticks[-1] - ticks[0]).total_seconds() >= seconds - period, (name, len(ticks))

    by_job: dict[str, set[str]] = {name: set() for name in PERIODS}
    for run in run_rows:
        assert run.trigger == "schedule", run
        by_job.setdefault(run.job_name, set()).add(run.id)
    for name in PERIODS:
        fired = {r.run_id for r in rows if r.schedule == name}
        assert by_job[name] == fired, (name, len(by_job[name]), len(fired))
    assert set(created) == {r.id for r in run_rows}
    assert set(created.values()) == {1}, "a run was created more than once"


@pytest.mark.postgres
def test_three_scheduler_processes_decide_each_tick_once_on_postgres(tmp_path: Path) -> None:
    _require_postgres()
    with fresh_postgres_database() as url:
        run_and_check(url, tmp_path, seconds=20)


def test_three_scheduler_processes_share_one_sqlite_file(tmp_path: Path) -> None:
    run_and_check(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path, seconds=6)
