"""The ``Job`` model: one validated, immutable job definition.

A Job comes from a TOML file (see :mod:`jobrunner.spec.loader`) or from Python
(``Job(name="x", image="python:3.12", cmd=[...])``); both go through the same validation, which
collects every problem before raising one :class:`JobSpecError`. A Job never holds a secret's
value: ``secrets`` lists environment variable names, read when a machine config is built.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jobrunner.durations import format_duration
from jobrunner.machines.models import Guest, Init, MachineConfig, Restart, StopConfig
from jobrunner.spec.files import FILE_KEYS, JobFile
from jobrunner.spec.guest import DEFAULT_SIZE, GuestSpec, preset_guest, size_problem
from jobrunner.spec.mounts import MOUNT_KEYS, JobMounts
from jobrunner.spec.problems import (
    MISSING,
    JobSpecError,
    Problem,
    Utf8Str,
    problems_from_errors,
    spec_error,
)
from jobrunner.spec.retry import RetryPolicy, duration_field
from jobrunner.spec.schedule import SCHEDULE_KEYS, schedule_problems
from jobrunner.spec.text import is_utf8, printable

__all__ = ["SNAPSHOT_FORMAT", "Job", "JobSnapshot"]

SNAPSHOT_FORMAT = 1
RESERVED_METADATA_PREFIX = "jobrunner_"
# Stop signals the Machines API knows by name (fly-machines-api.md section 7).
STOP_SIGNALS = frozenset(
    {
        *("SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGTERM"),
        *("SIGABRT", "SIGALRM", "SIGFPE", "SIGILL", "SIGPIPE", "SIGSEGV", "SIGTRAP"),
    }
)
_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REGION = re.compile(r"[a-z][a-z0-9-]{1,15}")
_APP = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class JobSnapshot(dict[str, Any]):
    """A job's snapshot (a plain JSON-safe dict) carrying, beside it, the bytes of the files it
    refers to by digest: ``blobs`` maps sha256 -> a function returning the bytes.

    The ledger stores those bytes once in its blob store before the run row that refers to
    them (``Store.create_run``, ``enqueue_runs``, ``record_fires``); a copy of the dict
    (``dict(snapshot)``) loses them, and a ledger then requires the blobs to be there already.
    """

    blobs: dict[str, Callable[[], bytes]]

    def __init__(self, data: Mapping[str, Any], blobs: Mapping[str, Callable[[], bytes]]) -> None:
        super().__init__(data)
        self.blobs = dict(blobs)


class Job(BaseModel):
    """A job definition: what to run, on what machine, with which limits and retry rules."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    # Free-form text is Utf8Str (refused unless it can be sent as JSON); the other strings are
    # checked against patterns or lists of names that hold only ASCII.
    name: str
    description: Utf8Str = ""
    image: Utf8Str
    cmd: list[Utf8Str] | None = None
    entrypoint: list[Utf8Str] | None = None
    exec: list[Utf8Str] | None = None
    env: dict[Utf8Str, Utf8Str] = Field(default_factory=dict)
    secrets: list[str] = Field(default_factory=list)
    files: list[JobFile] = Field(default_factory=list)
    mounts: JobMounts = Field(default_factory=list)
    guest: GuestSpec | None = None
    size: str | None = None
    region: str | None = None
    fallback_regions: list[str] = Field(default_factory=list)
    timeout: float | None = None
    stop_signal: str = "SIGINT"
    stop_timeout: float = 10.0
    retries: RetryPolicy = Field(default_factory=RetryPolicy)
    metadata: dict[Utf8Str, Utf8Str] = Field(default_factory=dict)
    app: str | None = None
    # When it runs by itself (spec/schedule.py; checked together in _whole_job_problems).
    schedule: str | None = None
    timezone: str | None = None
    concurrency: Literal["allow", "forbid", "replace"] = "forbid"
    starting_deadline: float | None = None
    catch_up: Literal["none", "latest", "all"] = "latest"
    catch_up_limit: int = Field(default=100, ge=1, le=10_000)
    jitter: float = 0.0
    paused: bool = False
    history_limit: int | None = Field(default=100, ge=1)
    native: bool = False

    _source_path: Path | None = PrivateAttr(default=None)

    @classmethod
    def parse(
        cls,
        data: Mapping[str, Any],
        *,
        file: str | None = None,
        source_path: Path | None = None,
        environ: Mapping[str, str] | None = None,
        snapshot: bool = False,
    ) -> Job:
        """Validate ``data`` (a job file's table); raises :class:`JobSpecError`.

        ``file`` labels problems; ``source_path`` is the job file (its folder anchors relative
        ``source`` paths); ``environ``, when given, must hold every secret; ``snapshot`` accepts
        the stored form written by :meth:`snapshot`.
        """
        context = {
            "file": file,
            "source_path": source_path,
            "base_dir": source_path.parent if source_path else None,
            "environ": environ,
            "snapshot": snapshot,
        }
        return cls.model_validate(dict(data), context=context)

    # ----- field checks -----

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise spec_error(
                "a job name may hold only letters, digits, '-' and '_' (up to 100)",
                'set name = "my-job" (a job file\'s name defaults to the file name without .toml)',
            )
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() for c in value):
            raise spec_error("must be an image reference", 'write e.g. image = "python:3.12-slim"')
        return value

    @field_validator("cmd", "entrypoint", "exec", mode="before")
    @classmethod
    def _argv(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = shlex.split(value)
            except ValueError as exc:
                raise spec_error(
                    f"cannot split the command like a shell would: {exc}",
                    "check the quotes, or write a list of strings",
                ) from None
        if isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                if not isinstance(item, str):
                    raise spec_error("must be a string", "quote every argument", key=index)
            if not value:
                raise spec_error("must not be empty", "give the program and its arguments")
            return list(value)
        raise spec_error(
            "must be a list of strings or a command string",
            'write e.g. ["python3", "main.py"] or "python3 main.py"',
        )

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.fullmatch(name):
                raise spec_error(
                    "the name is not a valid environment variable name",
                    "use letters, digits and '_', not starting with a digit",
                    key=name,
                )
        return value

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, value: list[str]) -> list[str]:
        for index, name in enumerate(value):
            if not _ENV_NAME.fullmatch(name):
                raise spec_error(
                    "is not a valid environment variable name",
                    "list the names of variables in your environment, e.g. API_TOKEN",
                    key=index,
                )
            if name in value[:index]:
                raise spec_error("is listed twice", "list each secret once", key=index)
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        problem = size_problem(value)
        if problem is not None:
            raise spec_error(*problem)
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION.fullmatch(value):
            raise spec_error("is not a region code", 'write e.g. region = "ams"')
        return value

    @field_validator("fallback_regions")
    @classmethod
    def _fallback_regions(cls, value: list[str]) -> list[str]:
        for index, region in enumerate(value):
            if not _REGION.fullmatch(region):
                raise spec_error("is not a region code", 'write e.g. ["fra", "cdg"]', key=index)
        return value

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> Any:
        return None if value is None else duration_field(value, minimum_exclusive=True)

    @field_validator("starting_deadline", mode="before")
    @classmethod
    def _starting_deadline(cls, value: Any) -> Any:
        return None if value is None else duration_field(value, minimum_exclusive=True)

    @field_validator("jitter", mode="before")
    @classmethod
    def _jitter(cls, value: Any) -> Any:
        return duration_field(value)

    @field_validator("stop_timeout", mode="before")
    @classmethod
    def _stop_timeout(cls, value: Any) -> Any:
        return duration_field(value)

    @field_validator("stop_signal")
    @classmethod
    def _stop_signal(cls, value: str) -> str:
        name = value.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name not in STOP_SIGNALS:
            raise spec_error(
                "is not a signal the Machines API can send", f"use one of {sorted(STOP_SIGNALS)}"
            )
        return name

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.startswith(RESERVED_METADATA_PREFIX):
                raise spec_error(
                    f"the key is reserved: jobrunner tags its machines with "
                    f"'{RESERVED_METADATA_PREFIX}*' keys",
                    "rename the key",
                    key=key,
                )
            if not key:
                raise spec_error("metadata keys must not be empty", "give the key a name")
        return value

    @field_validator("app")
    @classmethod
    def _app(cls, value: str) -> str:
        if not _APP.fullmatch(value):
            raise spec_error(
                "is not a Fly app name", "use lowercase letters, digits and '-', e.g. my-jobs"
            )
        return value

    # ----- whole-job checks -----

    @model_validator(mode="wrap")
    @classmethod
    def _validate_all(
        cls, data: Any, handler: ModelWrapValidatorHandler[Job], info: ValidationInfo
    ) -> Job:
        # Field errors and whole-job errors are reported together, so the whole-job checks run on
        # the raw input even when some fields did not validate. JobSpecError is not a ValueError,
        # so pydantic lets it through unchanged: Job(...) and Job.model_validate(...) raise it.
        if not isinstance(data, dict):
            return handler(data)
        context = info.context or {}
        file = context.get("file")
        problems = _whole_job_problems(data, context.get("environ"), file)
        source_path = context.get("source_path")
        if source_path is not None and not is_utf8(str(source_path)):
            # The path is kept in the run's snapshot, which the ledger stores as JSON.
            problems.append(
                Problem(
                    file or printable(str(source_path)),
                    "",
                    MISSING,
                    "the job file's path is not valid UTF-8 text",
                    "rename the file (or its folder) to a UTF-8 name",
                )
            )
        try:
            job = handler(data)
        except ValidationError as exc:
            problems = (
                problems_from_errors(exc.errors(), file=file, allowed_keys=ALLOWED_KEYS) + problems
            )
        if problems:
            raise JobSpecError(problems)
        job._source_path = context.get("source_path")
        return job

    # ----- accessors -----

    @property
    def source_path(self) -> Path | None:
        """The job file this Job was loaded from (None when built in Python)."""
        return self._source_path

    def guest_resolved(self) -> Guest:
        """The explicit machine size: from ``guest``, else ``size``, else shared-cpu-1x."""
        if self.guest is not None:
            return self.guest.resolved()
        return preset_guest(self.size or DEFAULT_SIZE)

    def init(self) -> Init:
        """The Machines API ``init``: ``exec`` alone, or ``entrypoint`` and ``cmd``."""
        if self.exec is not None:
            return Init(exec=list(self.exec))
        return Init(
            entrypoint=list(self.entrypoint) if self.entrypoint else None,
            cmd=list(self.cmd) if self.cmd else None,
        )

    def secret_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The secrets' values from ``environ``; :class:`JobSpecError` names any that are unset
        or not valid UTF-8 (naming only the variable, never showing its value)."""
        problems = _secret_problems(self.secrets, environ, str(self.source_path or ""))
        if problems:
            raise JobSpecError(problems)
        return {name: environ[name] for name in self.secrets}

    def blob_digests(self) -> list[str]:
        """The sha256 of each file whose bytes are in the ledger's blob store, not in this Job
        (a job rebuilt from a snapshot): :meth:`to_machine_config` needs them as ``blobs``."""
        return [d for d in (f.blob_digest for f in self.files) if d is not None]

    def to_machine_config(
        self,
        *,
        environ: Mapping[str, str],
        metadata: Mapping[str, str],
        blobs: Mapping[str, bytes] | None = None,
    ) -> MachineConfig:
        """The complete machine config for one attempt of this job.

        Secrets are read from ``environ`` (a missing one raises :class:`JobSpecError` naming only
        the variable); ``metadata`` (jobrunner's tags) is merged over the job's own metadata;
        ``blobs`` (sha256 -> bytes) holds the files of :meth:`blob_digests`, else
        :class:`~jobrunner.spec.files.BlobMissing`.
        """
        env = {**self.env, **self.secret_env(environ)}
        return MachineConfig(
            image=self.image,
            init=self.init(),
            env=env,
            files=[f.to_api(blobs) for f in self.files] or None,
            mounts=[m.to_api() for m in self.mounts] or None,
            guest=self.guest_resolved(),
            auto_destroy=True,
            restart=Restart(policy="no"),
            # fly-go sends the grace period as a Go duration string; "10s" works on both APIs.
            stop_config=StopConfig(
                signal=self.stop_signal, timeout=format_duration(self.stop_timeout)
            ),
            metadata={**self.metadata, **metadata},
        )

    # ----- snapshots and copies -----

    def snapshot(self) -> JobSnapshot:
        """The JSON-safe definition as submitted: secret names (never values), durations in
        seconds, small files' bytes inline and larger files by sha256 and size, their bytes
        attached as the snapshot's ``blobs`` for the ledger to store once.
        :meth:`from_snapshot` rebuilds the Job from it."""
        data = self._snapshot_data()
        blobs: dict[str, Callable[[], bytes]] = {}
        files = []
        for entry in self.files:
            stored, blob = entry.snapshot()
            files.append(stored)
            if blob is not None:
                blobs[blob[0]] = blob[1]
        data["files"] = files
        return JobSnapshot(data, blobs)

    def _snapshot_data(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_none=True, exclude={"files"})
        if self.schedule is None:
            # An unscheduled job carries no schedule keys (their defaults would not load back).
            for key in SCHEDULE_KEYS:
                data.pop(key, None)
        data["format"] = SNAPSHOT_FORMAT
        data["source_path"] = str(self.source_path) if self.source_path else None
        return data

    @classmethod
    def from_snapshot(cls, snapshot: Mapping[str, Any]) -> Job:
        """Rebuild a Job stored with :meth:`snapshot` (secrets are read again when it runs)."""
        data = dict(snapshot)
        version = data.pop("format", SNAPSHOT_FORMAT)
        source = data.pop("source_path", None)
        if version != SNAPSHOT_FORMAT:
            problem = Problem(
                None,
                "format",
                version,
                f"this jobrunner reads job snapshots of format {SNAPSHOT_FORMAT} only",
                "upgrade jobrunner to the version that recorded this run",
            )
            raise JobSpecError([problem])
        path = Path(source) if source else None
        return cls.parse(data, file=source or "<snapshot>", source_path=path, snapshot=True)

    def with_overrides(
        self, env: Mapping[str, str] | None = None, timeout: float | None = None
    ) -> Job:
        """A copy with ``env`` merged over the job's env and/or a new ``timeout`` (seconds)."""
        data = self._snapshot_data()
        data["files"] = list(self.files)  # kept as they are, with their bytes
        data.pop("format")
        data.pop("source_path")
        if env:
            data["env"] = {**self.env, **env}
        if timeout is not None:
            data["timeout"] = timeout
        label = str(self.source_path) if self.source_path else None
        return Job.parse(data, file=label, source_path=self.source_path, snapshot=True)


ALLOWED_KEYS: dict[str, tuple[str, ...]] = {
    "": tuple(Job.model_fields),
    "files": FILE_KEYS,
    "mounts": MOUNT_KEYS,
    "guest": tuple(GuestSpec.model_fields),
    "retries": tuple(RetryPolicy.model_fields),
}


def _whole_job_problems(
    data: Mapping[str, Any], environ: Mapping[str, str] | None, file: str | None
) -> list[Problem]:
    problems: list[Problem] = schedule_problems(data, file)
    if data.get("guest") is not None and data.get("size") is not None:
        problems.append(
            Problem(
                file,
                "size",
                data["size"],
                "set either a [guest] table or size, not both",
                "remove size, or remove the [guest] table",
            )
        )
    if data.get("exec") is not None:
        for key in ("entrypoint", "cmd"):
            if data.get(key) is not None:
                problems.append(
                    Problem(
                        file,
                        key,
                        data[key],
                        "exec replaces the entrypoint and cmd, so this would be ignored",
                        f"remove {key}, or put the whole command in exec",
                    )
                )
    secrets = data.get("secrets")
    env = data.get("env")
    if isinstance(secrets, list) and all(isinstance(s, str) for s in secrets):
        if isinstance(env, dict):
            for index, name in enumerate(secrets):
                if name in env:
                    problems.append(
                        Problem(
                            file,
                            f"secrets[{index}]",
                            name,
                            f"{name} is both a secret and a plain [env] variable",
                            f"remove {name} from [env] (its value comes from your environment)",
                        )
                    )
        if environ is not None:
            problems.extend(_secret_problems(secrets, environ, file))
    return problems


def _secret_problems(
    secrets: list[str], environ: Mapping[str, str], file: str | None
) -> list[Problem]:
    # Only the variable's name is ever shown; a secret's value (not even where in it a bad
    # character sits) never goes into a problem.
    problems: list[Problem] = []
    for index, name in enumerate(secrets):
        if name not in environ:
            message = f"environment variable {name} is not set"
            fix = f"export {name} in the shell that submits the job, or remove it from secrets"
        elif not is_utf8(environ[name]):
            message = (
                f"the value of environment variable {name} is not valid UTF-8 text "
                "(it is a secret, so it is not shown), and the Machines API takes only UTF-8"
            )
            fix = (
                f"export {name} as UTF-8 text (base64-encode binary data and decode it in the job)"
            )
        else:
            continue
        problems.append(Problem(file or None, f"secrets[{index}]", name, message, fix))
    return problems
