"""``jobrunner runs ...`` (the ledger) and ``jobrunner gc`` (orphaned machines)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from jobrunner.cli import exitcodes
from jobrunner.cli.common import CliContext, common_options, err, print_json, utf8_flag
from jobrunner.cli.render import run_detail, run_dict, runs_table
from jobrunner.states import RUN_STATES

if TYPE_CHECKING:
    from jobrunner.config import Settings
    from jobrunner.events import RunEvent
    from jobrunner.machines.models import Machine

# Only `runs list`, `runs show` (and `logs`) are on the light read path (ledger_read): the other
# commands import the runner, the client and the store when they run.


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


@click.group("runs")
def runs_group() -> None:
    """Inspect and repair the run ledger."""


@runs_group.command("list")
@click.option("--job", callback=utf8_flag, help="Only runs of this job.")
@click.option(
    "--state",
    multiple=True,
    type=click.Choice(sorted(RUN_STATES)),
    help="Only runs in this state (repeatable).",
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@common_options
def list_command(job: str | None, state: tuple[str, ...], limit: int, ctx: CliContext) -> None:
    """List runs, newest first (--app and --backend, when given, filter them too)."""
    from jobrunner.cli.ledger_read import reading

    # Reading the ledger needs no backend settings (and so no Fly token).
    with reading() as ledger:
        runs = ledger.list_runs(
            job=job,
            states=state,
            app=ctx.app if ctx.app_given else None,
            backend=ctx.backend if ctx.backend_given else None,
            limit=limit,
        )
        attempts = ledger.attempts([r.id for r in runs])
    rows = [(r, attempts[r.id]) for r in runs]
    if ctx.json:
        print_json([run_dict(r, a) for r, a in rows])
    elif rows:
        sys.stdout.write(runs_table(rows))
    elif job or state or ctx.app_given or ctx.backend_given:
        err.print("no runs match these filters")
    else:
        err.print("no runs yet; start one with: jobrunner run jobs/hello.toml")


@runs_group.command("show")
@click.argument("run_id", metavar="RUN")
@common_options
def show_command(run_id: str, ctx: CliContext) -> None:
    """Show one run: outcome, attempts and every state change."""
    from jobrunner.cli.ledger_read import reading

    with reading() as ledger:
        run = ledger.get_run(run_id)
        attempts = ledger.attempts([run.id])[run.id]
        transitions = ledger.transitions(run.id)
    if ctx.json:
        from jobrunner.cli.render import attempt_dict

        data = run_dict(run, attempts)
        data["attempts_detail"] = [attempt_dict(a) for a in attempts]
        data["transitions"] = [
            {
                "from": t.from_state,
                "to": t.to_state,
                "attempt": t.attempt_number,
                "reason": t.reason,
                "at": t.at.isoformat(),
            }
            for t in transitions
        ]
        print_json(data)
    else:
        sys.stdout.write(run_detail(run, attempts, transitions))


@runs_group.command("reconcile")
@common_options
def reconcile_command(ctx: CliContext) -> None:
    """Resume every unfinished run whose driver has died and record each outcome once.

    Runs whose machines are still going are waited for; exit code 0 when every resumed run
    reached an outcome.
    """
    import anyio

    settings = ctx.settings()
    sys.exit(anyio.run(_reconcile, settings, ctx.json))


def _print_notices(event: RunEvent) -> None:
    if event.kind == "notice":
        err.print(f"[dim]jobrunner:[/] {_escape(event.message)}")


async def _reconcile(settings: Settings, as_json: bool) -> int:
    from jobrunner.session import open_runner

    async with open_runner(settings, on_event=_print_notices) as runner:
        done = await runner.reconcile()
        rows = [(r, await runner.ledger.get_attempts(r.id)) for r in done.runs]
    if as_json:
        print_json([run_dict(r, a) for r, a in rows])
    elif rows:
        sys.stdout.write(runs_table(rows))
    else:
        err.print("nothing to reconcile: every run is finished or has a live driver")
    # A run waiting for its retry's time is not a failure; a run that raised is.
    unfinished = sorted(done.errors)
    if unfinished:
        # The reason for each was printed as it happened; the runs stay in the ledger as they were.
        err.print(
            f"{len(unfinished)} run(s) could not be finished now ({', '.join(unfinished)}); "
            "run `jobrunner runs reconcile` again once the API or ledger answers"
        )
        return exitcodes.BACKEND_ERROR
    return exitcodes.OK


@runs_group.command("retry")
@click.argument("run_id", metavar="RUN")
@click.option(
    "--attempts",
    type=click.IntRange(1, 100),
    default=None,
    help="Attempts to give it [default: the job's retries.max_attempts].",
)
@common_options
def retry_command(run_id: str, attempts: int | None, ctx: CliContext) -> None:
    """Queue a finished run (usually a dead one) again, under the same id, for workers.

    Its history stays; it gets new attempts and goes back to its queue (or `default`).
    """
    from jobrunner.cli.driving import ensure_shared_ledger
    from jobrunner.session import open_store
    from jobrunner.spec import Job
    from jobrunner.store import default_url
    from jobrunner.wakeup import notify

    settings = ctx.settings()
    ensure_shared_ledger(settings, "queue a run for a worker")
    store = open_store(settings)
    try:
        run = store.get_run(run_id)  # RunNotFound / ambiguous: exit 2
        extra = attempts or Job.from_snapshot(run.job_snapshot).retries.max_attempts
        try:
            run = store.retry_run(run.id, extra_attempts=extra)
        except ValueError as exc:
            err.print(f"[bold red]error:[/] {_escape(str(exc))}")
            sys.exit(exitcodes.USAGE)
    finally:
        store.close()
    notify(database_url=settings.database_url or default_url(), home=settings.home)
    if ctx.json:
        print_json(run_dict(run))
    else:
        err.print(
            f"[dim]jobrunner:[/] run {run.id} queued again on {_escape(run.queue or 'default')} "
            f"with {extra} more attempt(s); a `jobrunner worker` will run it"
        )
    sys.exit(exitcodes.OK)


@runs_group.command("drive", hidden=True)
@click.argument("run_id", metavar="RUN")
@common_options
def drive_command(run_id: str, ctx: CliContext) -> None:
    """Drive RUN to its outcome (used by `run --detach`)."""
    import anyio

    from jobrunner.cli.driving import TerminalPrinter, report
    from jobrunner.runner import RunBusy
    from jobrunner.session import open_runner

    settings = ctx.settings()

    async def go() -> int:
        async with open_runner(settings, on_event=TerminalPrinter(quiet=False)) as runner:
            try:
                run = await runner.wait(run_id)
                await runner.logs_settled(run.id)
            except RunBusy as exc:
                err.print(str(exc))
                return exitcodes.OK
            attempts = await runner.ledger.get_attempts(run.id)
            return report(run, attempts, as_json=False)

    sys.exit(anyio.run(go))


@click.command("gc")
@click.option("--yes", "-y", is_flag=True, help="Destroy without asking.")
@click.option("--dry-run", is_flag=True, help="Only list the orphaned machines.")
@common_options
def gc_command(yes: bool, dry_run: bool, ctx: CliContext) -> None:
    """Destroy machines tagged by jobrunner that no unfinished run owns.

    Without a terminal (or with --json), destroying needs --yes: without it the orphans are
    listed and the command exits 2.
    """
    import anyio

    from jobrunner.session import open_runner

    settings = ctx.settings()

    def describe(m: Machine) -> str:
        return f"  {m.id}  app={settings.app}  state={m.state}  run={_run_of(m)}"

    async def go() -> int:
        code = exitcodes.OK
        async with open_runner(settings) as runner:
            orphans = await runner.orphan_machines()
            destroy = bool(orphans) and not dry_run
            if orphans and not ctx.json:
                err.print(
                    f"{len(orphans)} orphaned machine(s) in app {settings.app}:", markup=False
                )
                for m in orphans:
                    err.print(describe(m), markup=False)
            if destroy and not yes:
                if ctx.json or not sys.stdin.isatty():
                    err.print(
                        "refusing to destroy without confirmation: pass --yes "
                        "(or --dry-run to only list them)",
                        markup=False,
                    )
                    destroy = False
                    code = exitcodes.USAGE
                else:
                    destroy = click.confirm(f"destroy these {len(orphans)} machines?")
            destroyed = []
            if destroy:
                for m in orphans:
                    await runner.destroy_machine(m.id)
                    destroyed.append(m.id)
        if ctx.json:
            print_json(
                {
                    "orphans": [
                        {
                            "machine_id": m.id,
                            "app": settings.app,
                            "state": m.state,
                            "run_id": _run_of(m),
                        }
                        for m in orphans
                    ],
                    "destroyed": destroyed,
                }
            )
        elif not orphans:
            err.print("no orphaned machines")
        elif dry_run:
            err.print(f"dry run: would destroy {len(orphans)} orphaned machine(s); nothing done")
        elif code == exitcodes.OK:
            err.print(f"destroyed {len(destroyed)} of {len(orphans)} orphaned machines")
        return code

    sys.exit(anyio.run(go))


def _run_of(machine: Machine) -> str:
    """The run a tagged machine was created for ("?" when the tag is missing)."""
    return machine.metadata_value("jobrunner_run_id") or "?"
