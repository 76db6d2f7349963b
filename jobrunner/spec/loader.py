"""Finding and reading job files: one job per ``jobs/<name>.toml``.

A job is named by its file stem unless the file sets ``name``. Loading checks everything (TOML
syntax, keys, types, files, sizes, secrets present in the environment) and raises one
:class:`JobSpecError` listing every problem, before anything talks to a Machines API.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobrunner.spec.job import Job
from jobrunner.spec.problems import MISSING, JobNotFound, JobSpecError, Problem
from jobrunner.spec.tomlguard import parse_toml, read_job_text

__all__ = ["DEFAULT_JOBS_DIR", "discover_jobs", "load_job", "resolve_job_path"]

DEFAULT_JOBS_DIR = Path("jobs")


def load_job(
    path_or_name: str | Path,
    *,
    jobs_dir: Path | None = None,
    check_secrets: bool = True,
    environ: Mapping[str, str] | None = None,
) -> Job:
    """Load and validate one job.

    ``path_or_name`` is a path to a ``.toml`` file, or a job name looked up in ``jobs_dir``
    (default ``./jobs``). With ``check_secrets`` every name in ``secrets`` must be set in
    ``environ`` (default ``os.environ``). Raises :class:`JobNotFound` or :class:`JobSpecError`.
    """
    path = resolve_job_path(path_or_name, jobs_dir=jobs_dir)
    env = os.environ if environ is None else environ
    return _load_file(path, environ=env if check_secrets else None)


def discover_jobs(
    jobs_dir: Path, *, check_secrets: bool = False, environ: Mapping[str, str] | None = None
) -> list[tuple[Path, Job | JobSpecError]]:
    """Every ``*.toml`` in ``jobs_dir`` (sorted), each loaded or with the error that stopped it.

    Secrets are not required by default (listing jobs must not need them); pass
    ``check_secrets=True`` to check them against ``environ`` (default ``os.environ``). Two files
    declaring the same job name make the later one an error.
    """
    env = os.environ if environ is None else environ
    results: list[tuple[Path, Job | JobSpecError]] = []
    seen: dict[str, Path] = {}
    for path in sorted(jobs_dir.glob("*.toml")):
        try:
            job: Job | JobSpecError = _load_file(path, environ=env if check_secrets else None)
        except JobSpecError as exc:
            job = exc
        if isinstance(job, Job):
            if job.name in seen:
                job = JobSpecError(
                    [
                        Problem(
                            str(path),
                            "name",
                            job.name,
                            f"the job name is already used by {seen[job.name]}",
                            "give one of the two jobs another name",
                        )
                    ]
                )
            else:
                seen[job.name] = path
        results.append((path, job))
    return results


def resolve_job_path(path_or_name: str | Path, *, jobs_dir: Path | None = None) -> Path:
    """The job file for a path or a job name (raises :class:`JobNotFound`)."""
    text = str(path_or_name)
    if isinstance(path_or_name, Path) or text.endswith(".toml") or os.sep in text or "/" in text:
        path = Path(path_or_name)
        if not path.is_file():
            raise JobNotFound(
                [Problem(text, "", MISSING, "job file not found", "check the path and try again")]
            )
        return path
    folder = jobs_dir if jobs_dir is not None else DEFAULT_JOBS_DIR
    candidate = folder / f"{text}.toml"
    if candidate.is_file():
        return candidate
    names: dict[str, Path] = {}
    for path in sorted(folder.glob("*.toml")):
        names.setdefault(_declared_name(path), path)
    if text in names:
        return names[text]
    close = difflib.get_close_matches(text, list(names), n=1, cutoff=0.6)
    if close:
        fix = f"did you mean {close[0]!r}?"
    elif names:
        fix = f"jobs in {folder}: {', '.join(sorted(names))}"
    else:
        fix = f"create {candidate}, or pass the path of a job file"
    raise JobNotFound([Problem(str(folder), "", MISSING, f"no job named {text!r}", fix)])


def _declared_name(path: Path) -> str:
    """The job name a file declares, or its stem (unreadable or invalid files count by stem)."""
    try:
        data = _read_toml(path, str(path))
    except JobSpecError:  # JobNotFound too
        return path.stem
    name = data.get("name")
    return name if isinstance(name, str) else path.stem


def _load_file(path: Path, *, environ: Mapping[str, str] | None) -> Job:
    label = str(path)
    data = _read_toml(path, label)
    data.setdefault("name", path.stem)
    return Job.parse(data, file=label, source_path=path.absolute(), environ=environ)


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    # Size and shape are checked before tomllib sees the text (spec/tomlguard.py).
    return parse_toml(read_job_text(path, label), label)
