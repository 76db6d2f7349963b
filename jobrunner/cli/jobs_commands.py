"""``jobrunner jobs list`` and ``jobrunner jobs validate``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from jobrunner.cli import exitcodes
from jobrunner.cli.common import CliContext, common_options, err, out, print_json
from jobrunner.durations import format_duration
from jobrunner.spec import Job, JobSpecError, discover_jobs, load_job

JOBS_DIR = click.option(
    "--jobs-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("jobs"),
    show_default=True,
    help="Directory of job files.",
)


@click.group("jobs")
def jobs_group() -> None:
    """Job definitions (one TOML file per job)."""


def _job_dict(path: Path, job: Job) -> dict[str, Any]:
    guest = job.guest_resolved()
    return {
        "name": job.name,
        "path": str(path),
        "image": job.image,
        "cpus": guest.cpus,
        "memory_mb": guest.memory_mb,
        "cpu_kind": guest.cpu_kind,
        "region": job.region,
        "timeout_s": job.timeout,
        "max_attempts": job.retries.max_attempts,
    }


@jobs_group.command("list")
@JOBS_DIR
@common_options
def list_command(jobs_dir: Path, ctx: CliContext) -> None:
    """List the jobs in --jobs-dir (invalid ones are listed with their first problem)."""
    found = discover_jobs(jobs_dir)
    valid = [(p, j) for p, j in found if isinstance(j, Job)]
    invalid = [(p, j) for p, j in found if isinstance(j, JobSpecError)]
    if ctx.json:
        print_json(
            {
                "jobs": [_job_dict(p, j) for p, j in valid],
                "invalid": [{"path": str(p), "errors": str(e).splitlines()} for p, e in invalid],
            }
        )
    else:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("JOB", "IMAGE", "GUEST", "TIMEOUT", "ATTEMPTS", "FILE"):
            table.add_column(column)
        for path, job in valid:
            g = job.guest_resolved()
            table.add_row(
                job.name,
                job.image,
                f"{g.cpus}x{g.cpu_kind} {g.memory_mb}MB",
                format_duration(job.timeout) if job.timeout else "-",
                str(job.retries.max_attempts),
                str(path),
            )
        if valid:
            out.print(table)
        for path, error in invalid:
            err.print(f"[red]invalid[/] {escape(str(path))}: {escape(str(error).splitlines()[0])}")
        if not found:
            err.print(f"no job files (*.toml) in {escape(str(jobs_dir))}")
    sys.exit(exitcodes.INVALID_JOB if invalid else exitcodes.OK)


@jobs_group.command("validate")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@JOBS_DIR
@click.option(
    "--no-check-secrets", is_flag=True, help="Do not require the jobs' secrets in the environment."
)
@common_options
def validate_command(
    paths: tuple[Path, ...], jobs_dir: Path, no_check_secrets: bool, ctx: CliContext
) -> None:
    """Check job files (default: every file in --jobs-dir); exit 65 if any is invalid."""
    targets = list(paths) or sorted(jobs_dir.glob("*.toml"))
    results: list[dict[str, Any]] = []
    for path in targets:
        try:
            job = load_job(path, check_secrets=not no_check_secrets)
            results.append({"path": str(path), "valid": True, "name": job.name, "errors": []})
        except JobSpecError as exc:
            results.append(
                {"path": str(path), "valid": False, "name": None, "errors": str(exc).splitlines()}
            )
    if ctx.json:
        print_json(results)
    else:
        for r in results:
            if r["valid"]:
                out.print(f"[green]ok[/]      {escape(r['path'])} ({r['name']})")
            else:
                out.print(f"[red]invalid[/] {escape(r['path'])}")
                for line in r["errors"]:
                    out.print(f"  {escape(line)}")
        if not targets:
            err.print(f"no job files given and none in {escape(str(jobs_dir))}")
    bad = any(not r["valid"] for r in results)
    sys.exit(exitcodes.INVALID_JOB if bad else exitcodes.OK)
