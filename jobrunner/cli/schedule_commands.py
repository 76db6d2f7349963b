"""``jobrunner scheduler`` (decide cron ticks) and ``jobrunner schedules ...`` (inspect them)."""

from __future__ import annotations

import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import click
from rich.markup import escape
from rich.table import Table

from jobrunner.cli import exitcodes
from jobrunner.cli.common import CliContext, common_options, err, out, print_json
from jobrunner.cli.driving import ensure_shared_ledger
from jobrunner.cli.jobs_commands import JOBS_DIR
from jobrunner.config import Settings
from jobrunner.session import open_store
from jobrunner.spec import Job, discover_jobs
from jobrunner.store import Fire, Store

NEXT_SHOWN = 3


def _scheduled_jobs(jobs_dir: Path) -> dict[str, tuple[Path, Job]]:
    """Every job in the folder with a schedule (cron or native); invalid files are skipped."""
    found: dict[str, tuple[Path, Job]] = {}
    for path, loaded in discover_jobs(jobs_dir):
        if isinstance(loaded, Job) and loaded.schedule is not None:
            found[loaded.name] = (path, loaded)
    return found


def _one(jobs_dir: Path, name: str) -> tuple[Path, Job]:
    found = _scheduled_jobs(jobs_dir)
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise click.BadParameter(
            f"no scheduled job named {name!r} in {jobs_dir} (scheduled jobs: {known})",
            param_hint="JOB",
        )
    return found[name]


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment is not None else None


def _next_times(job: Job, n: int, now: datetime) -> list[datetime]:
    from jobrunner.cron import CronSchedule

    if job.native or job.schedule is None:
        return []
    cron = CronSchedule.parse(job.schedule, job.timezone or "UTC")
    return [t.local for t in cron.next_ticks(now, n)]


def _fire_dict(fire: Fire, run_state: str | None = None) -> dict[str, Any]:
    return {
        "schedule": fire.schedule,
        "scheduled_for": _iso(fire.scheduled_for),
        "decision": fire.decision,
        "reason": fire.reason,
        "trigger": fire.trigger,
        "run_id": fire.run_id,
        "run_state": run_state,
        "decided_at": _iso(fire.decided_at),
    }


def _run_states(store: Store, fires: list[Fire]) -> dict[str, str]:
    states: dict[str, str] = {}
    for fire in fires:
        if fire.run_id is not None and fire.run_id not in states:
            try:
                states[fire.run_id] = store.get_run(fire.run_id).state
            except Exception:  # pruned since (history_limit): the fire row stays
                continue
    return states


@click.command("scheduler")
@JOBS_DIR
@common_options
def scheduler_command(jobs_dir: Path, ctx: CliContext) -> None:
    """Decide the ticks of the cron-scheduled jobs in --jobs-dir until stopped.

    Every tick becomes a queued run (for `jobrunner worker`) or a recorded skip. Job files are
    re-read when they change. SIGTERM or Ctrl-C stops it after the pass in progress. Any number
    of schedulers may share a ledger: each tick is decided exactly once. `jobrunner worker` runs
    one too unless given --no-scheduler.
    """
    settings = ctx.settings()
    sys.exit(anyio.run(_schedule, settings, jobs_dir))


async def _schedule(settings: Settings, jobs_dir: Path) -> int:
    from jobrunner.scheduler import Scheduler

    store = await anyio.to_thread.run_sync(open_store, settings)
    try:
        from jobrunner.store import default_url
        from jobrunner.wakeup import notify

        url = settings.database_url or default_url()
        scheduler = Scheduler(
            store,
            backend=settings.backend,
            app=settings.app,
            jobs_dir=jobs_dir,
            on_fired=lambda: notify(database_url=url, home=settings.home),
        )
        await scheduler.load()
        err.print(
            f"jobrunner: scheduler deciding {len(scheduler.schedules)} cron schedule(s) from "
            f"{jobs_dir}",
            markup=False,
        )
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        err.print(
                            f"jobrunner: {signal.Signals(signum).name}: stopping", markup=False
                        )
                        scheduler.stop()
                        return

            tg.start_soon(on_signals)
            await scheduler.run()
            tg.cancel_scope.cancel()
    finally:
        store.close()
    return exitcodes.OK


@click.group("schedules")
def schedules_group() -> None:
    """Inspect, pause, trigger and sync scheduled jobs."""


@schedules_group.command("list")
@JOBS_DIR
@common_options
def list_command(jobs_dir: Path, ctx: CliContext) -> None:
    """Every scheduled job: schedule, time zone, next fire times, last outcome, paused."""
    jobs = _scheduled_jobs(jobs_dir)
    store = open_store(ctx.settings())
    try:
        states = store.schedule_states(list(jobs))
        last = store.last_fires(list(jobs))
        run_states = _run_states(store, list(last.values()))
    finally:
        store.close()
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for name, (path, job) in sorted(jobs.items()):
        fire = last.get(name)
        rows.append(
            {
                "name": name,
                "path": str(path),
                "schedule": job.schedule,
                "native": job.native,
                "timezone": job.timezone or "UTC",
                "paused": job.paused or (name in states and states[name].paused),
                "next": [_iso(t) for t in _next_times(job, NEXT_SHOWN, now)],
                "last": _fire_dict(fire, run_states.get(fire.run_id or "")) if fire else None,
            }
        )
    if ctx.json:
        print_json(rows)
        return
    if not rows:
        err.print(f'no scheduled jobs in {escape(str(jobs_dir))}; add schedule = "0 * * * *"')
        return
    table = Table(box=None)
    for column in ("job", "schedule", "zone", "next fires", "last", "paused"):
        table.add_column(column)
    for row in rows:
        last_fire = row["last"]
        if last_fire is None:
            last_text = "-"
        elif last_fire["decision"] == "skipped":
            last_text = f"skipped ({(last_fire['reason'] or '').split(':')[0]})"
        else:
            last_text = last_fire["run_state"] or "fired"
        next_text = ", ".join(t[11:19] for t in row["next"]) if row["next"] else "(Fly decides)"
        table.add_row(
            escape(row["name"]),
            escape(str(row["schedule"])) + (" (native)" if row["native"] else ""),
            escape(row["timezone"]),
            next_text,
            escape(last_text),
            "yes" if row["paused"] else "",
        )
    out.print(table)


@schedules_group.command("next")
@click.argument("name", metavar="JOB")
@click.option("-n", "count", type=click.IntRange(1, 1000), default=5, show_default=True)
@JOBS_DIR
@common_options
def next_command(name: str, count: int, jobs_dir: Path, ctx: CliContext) -> None:
    """The next fire times of JOB, in its time zone."""
    _path, job = _one(jobs_dir, name)
    if job.native:
        raise click.BadParameter(
            f"{name} is a native schedule ({job.schedule}): Fly decides its times",
            param_hint="JOB",
        )
    times = _next_times(job, count, datetime.now(UTC))
    if ctx.json:
        print_json([{"local": t.isoformat(), "utc": _iso(t)} for t in times])
        return
    for moment in times:
        out.print(f"{moment:%Y-%m-%d %H:%M:%S %Z}  ({_iso(moment)})")


def _set_paused(name: str, jobs_dir: Path, ctx: CliContext, paused: bool) -> None:
    _one(jobs_dir, name)
    store = open_store(ctx.settings())
    try:
        store.set_schedule_paused(name, paused)
    finally:
        store.close()
    word = "paused" if paused else "resumed"
    if ctx.json:
        print_json({"schedule": name, "paused": paused})
    else:
        err.print(f"jobrunner: schedule {escape(name)} {word} (every scheduler sees it)")


@schedules_group.command("pause")
@click.argument("name", metavar="JOB")
@JOBS_DIR
@common_options
def pause_command(name: str, jobs_dir: Path, ctx: CliContext) -> None:
    """Pause JOB's schedule: its ticks are recorded as skipped until resumed."""
    _set_paused(name, jobs_dir, ctx, True)


@schedules_group.command("resume")
@click.argument("name", metavar="JOB")
@JOBS_DIR
@common_options
def resume_command(name: str, jobs_dir: Path, ctx: CliContext) -> None:
    """Resume JOB's schedule (a `paused = true` in the job file still pauses it)."""
    _set_paused(name, jobs_dir, ctx, False)


@schedules_group.command("trigger")
@click.argument("name", metavar="JOB")
@JOBS_DIR
@common_options
def trigger_command(name: str, jobs_dir: Path, ctx: CliContext) -> None:
    """Fire JOB now, outside its schedule (recorded as a manual fire; a worker runs it)."""
    from jobrunner.scheduler import Scheduler
    from jobrunner.store import default_url
    from jobrunner.wakeup import notify

    _path, job = _one(jobs_dir, name)
    if job.native:
        raise click.BadParameter(
            f"{name} is a native schedule: start its machine with `fly machine start`",
            param_hint="JOB",
        )
    settings = ctx.settings()
    ensure_shared_ledger(settings, "queue a run for a worker")
    store = open_store(settings)
    try:
        scheduler = Scheduler(store, backend=settings.backend, app=settings.app, jobs=[job])

        async def fire() -> Fire:
            await scheduler.load()
            return await scheduler.trigger(name)

        recorded = anyio.run(fire)
    finally:
        store.close()
    notify(database_url=settings.database_url or default_url(), home=settings.home)
    if ctx.json:
        print_json(_fire_dict(recorded, "pending"))
    else:
        err.print(
            f"jobrunner: {escape(name)} fired by hand as run {recorded.run_id}; "
            "a `jobrunner worker` runs it"
        )
    sys.exit(exitcodes.OK)


@schedules_group.command("history")
@click.argument("name", metavar="JOB")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@common_options
def history_command(name: str, limit: int, ctx: CliContext) -> None:
    """JOB's fire decisions, newest first: fired (with the run) or skipped (with why)."""
    store = open_store(ctx.settings())
    try:
        fires = store.list_fires(name, limit=limit)
        run_states = _run_states(store, fires)
    finally:
        store.close()
    rows = [_fire_dict(f, run_states.get(f.run_id or "")) for f in fires]
    if ctx.json:
        print_json(rows)
        return
    if not rows:
        err.print(f"no decisions recorded for {escape(name)} yet")
        return
    table = Table(box=None)
    for column in ("scheduled for (UTC)", "decision", "run", "why"):
        table.add_column(column)
    for row in rows:
        run = f"{row['run_id'][:12]} {row['run_state'] or ''}" if row["run_id"] else ""
        why = row["reason"] or ("by hand" if row["trigger"] == "manual" else row["trigger"])
        table.add_row(row["scheduled_for"][:19], row["decision"], run, escape(why))
    out.print(table)


@schedules_group.command("sync")
@click.option("--dry-run", is_flag=True, help="Only print what would change.")
@JOBS_DIR
@common_options
def sync_command(dry_run: bool, jobs_dir: Path, ctx: CliContext) -> None:
    """Make one persistent machine per native schedule (`native = true`) match the job files:
    create, update (under a lease) or destroy; then record their runs in the ledger."""
    settings = ctx.settings()
    # Every loaded job, not only native ones: a job that stopped being native loses its machine.
    jobs = [loaded for _path, loaded in discover_jobs(jobs_dir) if isinstance(loaded, Job)]
    sys.exit(anyio.run(_sync, settings, jobs, dry_run, ctx.json))


async def _sync(settings: Settings, jobs: list[Job], dry_run: bool, as_json: bool) -> int:
    import os

    from jobrunner import native
    from jobrunner.session import open_client

    store = await anyio.to_thread.run_sync(open_store, settings)
    client = await open_client(settings, store)
    try:
        actions = await native.plan_sync(client, jobs, app=settings.app, environ=os.environ)
        results = [] if dry_run else await native.apply_sync(client, actions)
        imported = None
        if not dry_run:
            imported = await native.import_runs(
                client, store, app=settings.app, backend=settings.backend, jobs=jobs
            )
    finally:
        await client.aclose()
        store.close()
    report = native.sync_report(actions, results, imported, dry_run=dry_run)
    if as_json:
        print_json(report)
    else:
        for line in native.sync_lines(report):
            out.print(escape(line))
    return exitcodes.OK if report.get("ok", True) else exitcodes.BACKEND_ERROR
