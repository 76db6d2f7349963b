"""``jobrunner jobs list`` and ``jobrunner jobs validate``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from jobrunner.cli import exitcodes
from jobrunner.cli.common import CliContext, common_options, print_json
from jobrunner.cli.tables import color_enabled, paint, write_table

if TYPE_CHECKING:
    from jobrunner.spec import Job

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


def _existing_dir(jobs_dir: Path) -> None:
    """--jobs-dir must name a folder that exists (exit 2), not silently list nothing."""
    if not jobs_dir.is_dir():
        problem = "is not a directory" if jobs_dir.exists() else "does not exist"
        raise click.BadParameter(
            f"{str(jobs_dir)!r} {problem}; pass the folder holding your job files (*.toml)",
            param_hint="'--jobs-dir'",
        )


def _say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


@jobs_group.command("list")
@JOBS_DIR
@common_options
def list_command(jobs_dir: Path, ctx: CliContext) -> None:
    """List the jobs in --jobs-dir (invalid ones are listed with their first problem)."""
    from jobrunner.durations import format_duration
    from jobrunner.spec import Job, JobSpecError, discover_jobs

    _existing_dir(jobs_dir)
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
        rows = []
        for path, job in valid:
            g = job.guest_resolved()
            rows.append(
                [
                    job.name,
                    job.image or "-",
                    f"{g.cpus}x{g.cpu_kind} {g.memory_mb}MB",
                    format_duration(job.timeout) if job.timeout else "-",
                    str(job.retries.max_attempts),
                    str(path),
                ]
            )
        if valid:
            write_table(("JOB", "IMAGE", "GUEST", "TIMEOUT", "ATTEMPTS", "FILE"), rows)
        color = color_enabled(sys.stderr)
        for path, error in invalid:
            _say(f"{paint('invalid', 'red', color=color)} {path}: {str(error).splitlines()[0]}")
        if not found:
            _say(f"no job files (*.toml) in {jobs_dir}")
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
    from jobrunner.spec import JobSpecError, load_job

    if not paths:
        _existing_dir(jobs_dir)
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
        color = color_enabled(sys.stdout)
        for r in results:
            if r["valid"]:
                print(f"{paint('ok', 'green', color=color)}      {r['path']} ({r['name']})")
            else:
                print(f"{paint('invalid', 'red', color=color)} {r['path']}")
                for line in r["errors"]:
                    print(f"  {line}")
        if not targets:
            _say(f"no job files given and none in {jobs_dir}")
    bad = any(not r["valid"] for r in results)
    sys.exit(exitcodes.INVALID_JOB if bad else exitcodes.OK)
