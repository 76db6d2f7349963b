"""``jobrunner worker`` (drain the queue) and ``jobrunner queues`` (what is waiting)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import anyio
import click

from jobrunner.cli import exitcodes
from jobrunner.cli.common import CliContext, common_options, err, out, print_json
from jobrunner.cli.jobs_commands import JOBS_DIR
from jobrunner.config import Settings, parse_queue_limits
from jobrunner.events import RunEvent
from jobrunner.session import open_runner, open_store


def _notices(event: RunEvent) -> None:
    if event.kind == "notice":
        err.print(f"[dim]jobrunner:[/] {event.message}", markup=False)
    elif event.kind == "state" and event.state is not None and event.state != "pending":
        if event.state in {"creating", "starting", "running"}:
            return  # a worker's stderr shows outcomes, not every step of every run
        err.print(f"jobrunner: run {event.run_id} {event.state}", markup=False)


@click.command("worker")
@click.option(
    "--queue",
    "queues",
    multiple=True,
    metavar="NAME",
    help="A queue to serve (repeatable) [default: default].",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 100_000),
    default=16,
    show_default=True,
    help="Runs driven at once.",
)
@click.option(
    "--grace",
    type=click.FloatRange(0, 86_400),
    default=30.0,
    show_default=True,
    help="Seconds to keep driving runs in hand after SIGTERM before releasing them.",
)
@click.option(
    "--queue-limit",
    "queue_limit",
    multiple=True,
    metavar="QUEUE=N",
    help="At most N runs of QUEUE in flight over all workers (repeatable) "
    "[env JOBRUNNER_QUEUE_LIMITS].",
)
@click.option(
    "--no-scheduler",
    is_flag=True,
    help="Do not also decide the cron ticks of the scheduled jobs in --jobs-dir.",
)
@JOBS_DIR
@common_options
def worker_command(
    queues: tuple[str, ...],
    concurrency: int,
    grace: float,
    queue_limit: tuple[str, ...],
    no_scheduler: bool,
    jobs_dir: Path,
    ctx: CliContext,
) -> None:
    """Claim queued runs and drive them until stopped.

    Serves the given queues in priority order, adopts runs whose driver died, and on SIGTERM
    (or Ctrl-C) stops claiming, keeps driving what it has for --grace seconds, then releases the
    rest for another worker and exits 0. A second signal releases at once.

    It also runs the cron scheduler for the scheduled jobs in --jobs-dir (one process to
    deploy), unless given --no-scheduler; several may share a ledger, each tick fires once.
    """
    settings = ctx.settings()
    limits = dict(settings.queue_limits)
    limits.update(parse_queue_limits(",".join(queue_limit), source="--queue-limit"))
    schedules = None if no_scheduler else jobs_dir
    sys.exit(
        anyio.run(
            _work, settings, list(queues) or ["default"], concurrency, grace, limits, schedules
        )
    )


async def _work(
    settings: Settings,
    queues: list[str],
    concurrency: int,
    grace: float,
    limits: dict[str, int],
    jobs_dir: Path | None,
) -> int:
    from jobrunner.scheduler import Scheduler
    from jobrunner.store import default_url
    from jobrunner.wakeup import Wakeup, notify
    from jobrunner.worker import Worker

    url = settings.database_url or default_url()
    store = await anyio.to_thread.run_sync(open_store, settings)
    async with (
        open_runner(settings, store=store, on_event=_notices) as runner,
        await Wakeup.open(database_url=url, home=settings.home) as wakeup,
    ):
        worker = Worker(
            runner,
            queues=queues,
            concurrency=concurrency,
            grace=grace,
            queue_limits=limits,
            wakeup=wakeup,
        )
        err.print(
            f"jobrunner: worker {runner.owner} serving {', '.join(worker.queues)} "
            f"({concurrency} at a time) on the {settings.backend} backend",
            markup=False,
        )
        scheduler = None
        if jobs_dir is not None:
            scheduler = Scheduler(
                store,
                backend=settings.backend,
                app=settings.app,
                jobs_dir=jobs_dir,
                on_fired=lambda: notify(database_url=url, home=settings.home),
            )
        async with anyio.create_task_group() as tg:
            if scheduler is not None:
                tg.start_soon(scheduler.run)

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    seen = 0
                    async for signum in signals:
                        seen += 1
                        if seen == 1:
                            err.print(
                                f"jobrunner: {signal.Signals(signum).name}: no new runs; "
                                f"finishing the {worker.in_flight} in hand (up to {grace:g}s)",
                                markup=False,
                            )
                            worker.grace = min(worker.grace, grace)
                            worker.stop()
                            if scheduler is not None:
                                scheduler.stop()
                        else:
                            worker.grace = 0
                            worker.stop()
                            tg.cancel_scope.cancel()

            tg.start_soon(on_signals)
            stats = await worker.run()
            tg.cancel_scope.cancel()
    store.close()
    err.print(
        f"jobrunner: worker stopped: {stats.finished} finished, {stats.adopted} adopted, "
        f"{stats.released} released to other workers",
        markup=False,
    )
    return exitcodes.OK


@click.command("queues")
@common_options
def queues_command(ctx: CliContext) -> None:
    """Show every queue: runs waiting, in flight and dead."""
    store = open_store(ctx.settings())
    try:
        stats = store.queue_stats()
    finally:
        store.close()
    if ctx.json:
        print_json(stats)
        return
    if not stats:
        err.print("no queued runs yet; enqueue from Python with JobRunner().enqueue(job)")
        return
    from rich.table import Table

    table = Table(box=None)
    for column in ("queue", "pending", "in_flight", "dead"):
        table.add_column(column.replace("_", " "), justify="left" if column == "queue" else "right")
    for entry in stats:
        table.add_row(*(str(entry[c]) for c in ("queue", "pending", "in_flight", "dead")))
    out.print(table)
