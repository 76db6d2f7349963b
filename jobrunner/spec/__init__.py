"""Job definitions: the ``Job`` model, loading ``jobs/*.toml`` files, and their validation errors.

    from jobrunner.spec import Job, load_job, discover_jobs, JobSpecError

See docs/jobs.md for every key a job file may hold.
"""

from __future__ import annotations

from jobrunner.durations import format_duration, parse_duration
from jobrunner.spec.files import JobFile
from jobrunner.spec.guest import DEFAULT_SIZE, SIZE_PRESETS, GuestSpec
from jobrunner.spec.job import SNAPSHOT_FORMAT, Job
from jobrunner.spec.loader import DEFAULT_JOBS_DIR, discover_jobs, load_job, resolve_job_path
from jobrunner.spec.problems import MISSING, JobNotFound, JobSpecError, Problem
from jobrunner.spec.retry import OUTCOMES, RetryPolicy

__all__ = [
    "DEFAULT_JOBS_DIR",
    "DEFAULT_SIZE",
    "MISSING",
    "OUTCOMES",
    "SIZE_PRESETS",
    "SNAPSHOT_FORMAT",
    "GuestSpec",
    "Job",
    "JobFile",
    "JobNotFound",
    "JobSpecError",
    "Problem",
    "RetryPolicy",
    "discover_jobs",
    "format_duration",
    "load_job",
    "parse_duration",
    "resolve_job_path",
]
