"""Validation problems of a job definition, and the one exception that carries them all.

A job file is checked completely before any machine exists, and every problem found is reported
at once: each one names the file, the dotted key (``files[1].guest_path``), the offending value,
what is wrong and how to fix it. Pydantic's own errors are translated here into that shape, so
users never see "Input should be a valid string" without the key and a fix next to it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AfterValidator
from pydantic_core import ErrorDetails, PydanticCustomError

from jobrunner.errors import JobrunnerError
from jobrunner.spec.text import UTF8_FIX, printable, utf8_problem

__all__ = ["MISSING", "JobNotFound", "JobSpecError", "Problem", "Utf8Str", "spec_error"]


class _Missing:
    """Marks a problem about a key that is absent (so there is no value to show)."""

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> str:
        return "MISSING"  # unpickles to the one module-level instance, so `is MISSING` holds


MISSING: Any = _Missing()

# The error type of problems raised by jobrunner's own validators (see spec_error).
SPEC_ERROR_TYPE = "jobrunner_spec"

_MAX_VALUE_CHARS = 60


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job definition.

    ``key`` is a dotted path (``files[1].guest_path``; list positions count from 0), or ``""`` when
    the problem is about the whole file (e.g. a TOML syntax error, which has ``line``/``column``).
    ``value`` is what was found, or :data:`MISSING`; it never holds a secret's value.
    """

    file: str | None
    key: str
    value: Any
    message: str
    fix: str
    line: int | None = field(default=None, compare=False)
    column: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        parts: list[str] = []
        if self.file:
            parts.append(printable(self.file))
        if self.line is not None:
            parts.append(f"line {self.line}, column {self.column or 1}")
        if self.key:
            if self.value is MISSING:
                parts.append(self.key)
            else:
                parts.append(f"{self.key} = {_short_repr(self.value)}")
        text = ": ".join([*parts, self.message])
        return f"{text}; {self.fix}" if self.fix else text


def _short_repr(value: Any) -> str:
    text = repr(value)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


class JobSpecError(JobrunnerError):
    """A job file or ``Job(...)`` that does not validate; ``.problems`` lists every problem."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); ours takes problems, not the message.
        return (type(self), (self.problems,))

    def with_file(self, file: str) -> JobSpecError:
        """A copy whose problems without a file name are attributed to ``file``."""
        problems = [p if p.file else _replace_file(p, file) for p in self.problems]
        return type(self)(problems)


class JobNotFound(JobSpecError):
    """No job file matches the name or path that was asked for."""


def _replace_file(problem: Problem, file: str) -> Problem:
    return Problem(
        file, problem.key, problem.value, problem.message, problem.fix, problem.line, problem.column
    )


def spec_error(message: str, fix: str, *, key: str | int | None = None) -> PydanticCustomError:
    """An error for a pydantic validator, translated into a :class:`Problem` later.

    ``key`` names a sub-key (or list position) of the location the validator runs at (a model
    validator on a file entry can point at ``guest_path``), so the problem shows the most precise
    dotted path.
    """
    return PydanticCustomError(
        SPEC_ERROR_TYPE, "{message}", {"message": message, "fix": fix, "key": key}
    )


def _check_utf8(value: str) -> str:
    problem = utf8_problem(value)
    if problem is not None:
        raise spec_error(problem, UTF8_FIX)
    return value


# A string of a job (a field, list item, or table key or value): refused unless it can be encoded
# as UTF-8, since it goes to the Machines API and the ledger as JSON (see jobrunner.spec.text).
Utf8Str = Annotated[str, AfterValidator(_check_utf8)]


def dotted_key(loc: Iterable[int | str]) -> str:
    """``("files", 1, "guest_path")`` -> ``"files[1].guest_path"`` (printable: a key holding
    text UTF-8 cannot encode shows it escaped, ``env.\\udcff``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = printable(str(part))
            out += f".{part}" if out else part
    return out


def _schema_path(loc: Sequence[int | str]) -> str:
    """The key's place in the schema: list positions and free-form table keys dropped."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            continue
        if parts and parts[-1] in ("env", "metadata"):
            parts.append("*")
            continue
        parts.append(part)
    return ".".join(parts)


# Keys that people coming from Docker, fly.toml or other runners type, and what they meant.
_SYNONYMS = {
    "": {
        "command": "cmd",
        "args": "cmd",
        "environment": "env",
        "variables": "env",
        "secret": "secrets",
        "file": "files",
        "retry": "retries",
        "max_retries": "retries.max_attempts",
        "attempts": "retries.max_attempts",
        "memory": "guest.memory_mb",
        "memory_mb": "guest.memory_mb",
        "cpus": "guest.cpus",
        "cpu_kind": "guest.cpu_kind",
        "vm_size": "size",
        "preset": "size",
        "kill_signal": "stop_signal",
        "kill_timeout": "stop_timeout",
        "regions": "fallback_regions",
        "labels": "metadata",
        "app_name": "app",
    },
    "files": {
        "path": "guest_path",
        "text": "content",
        "local_path": "source",
        "secret": "secret_name",
    },
    "guest": {"memory": "memory_mb", "cpu": "cpus", "kind": "cpu_kind", "gpu": "gpu_kind"},
    "retries": {"attempts": "max_attempts", "max_retries": "max_attempts", "delay": "backoff"},
}

# What a correct value looks like, by schema path; used to build the "fix" of type errors.
EXAMPLES = {
    "name": 'name = "nightly-report"',
    "description": 'description = "Builds the nightly report"',
    "image": 'image = "python:3.12-slim"',
    "cmd": 'cmd = ["python3", "-c", "print(1)"] or cmd = "python3 -c \'print(1)\'"',
    "entrypoint": 'entrypoint = ["/bin/sh", "-c"]',
    "exec": 'exec = ["python3", "/app/main.py"]',
    "env": '[env] then one NAME = "value" per line',
    "env.*": 'NAME = "value" under [env] (quote numbers and booleans: PORT = "8080")',
    "secrets": 'secrets = ["API_TOKEN"]',
    "files": '[[files]] with guest_path = "/etc/app.conf" and content = "..."',
    "files.guest_path": 'guest_path = "/etc/app/config.json"',
    "files.content": 'content = "text of the file"',
    "files.source": 'source = "data/config.json" (relative to the job file)',
    "files.secret_name": 'secret_name = "APP_CONFIG_B64"',
    "files.mode": 'mode = "0600" (or 384)',
    "guest": "[guest] with cpus = 2, memory_mb = 1024",
    "guest.cpus": "cpus = 2",
    "guest.memory_mb": "memory_mb = 1024",
    "guest.cpu_kind": 'cpu_kind = "shared" (or "performance")',
    "guest.gpu_kind": 'gpu_kind = "a10"',
    "guest.gpus": "gpus = 1",
    "size": 'size = "shared-cpu-2x"',
    "region": 'region = "ams"',
    "fallback_regions": 'fallback_regions = ["fra", "cdg"]',
    "timeout": 'timeout = "10m"',
    "stop_signal": 'stop_signal = "SIGTERM"',
    "stop_timeout": 'stop_timeout = "30s"',
    "retries": "[retries] with max_attempts = 3",
    "retries.max_attempts": "max_attempts = 3",
    "retries.backoff": 'backoff = "10s"',
    "retries.backoff_factor": "backoff_factor = 2.0",
    "retries.max_backoff": 'max_backoff = "5m"',
    "retries.exit_codes": 'exit_codes = "any" or exit_codes = [1, 75]',
    "retries.oom": "oom = true",
    "retries.capacity": "capacity = true",
    "retries.lost": "lost = true",
    "retries.timeout": "timeout = false",
    "metadata": '[metadata] then one key = "value" per line',
    "metadata.*": 'team = "data" under [metadata]',
    "app": 'app = "my-jobs-app"',
}

_TYPE_MESSAGES = {
    "string_type": "must be a string",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "missing": "is required",
}


def _example_fix(schema_path: str) -> str:
    example = EXAMPLES.get(schema_path)
    return f"write it like: {example}" if example else "see docs/jobs.md for the expected type"


def problems_from_errors(
    errors: Iterable[ErrorDetails], *, file: str | None, allowed_keys: Mapping[str, Sequence[str]]
) -> list[Problem]:
    """Translate pydantic error details into Problems."""
    errors = list(errors)
    # Pydantic spells a table key that is not valid UTF-8 lossily in every loc; its "[key]" error
    # holds the real key, so the errors about that key's value can name it too.
    real_keys = {
        tuple(error["loc"][:-1]): error["input"]
        for error in errors
        if error["loc"][-1:] == ("[key]",) and isinstance(error["input"], str)
    }
    if real_keys:
        errors = [_with_real_key(error, real_keys) for error in errors]
    return [_problem_from_error(error, file, allowed_keys) for error in errors]


def _with_real_key(
    error: ErrorDetails, real_keys: Mapping[tuple[int | str, ...], str]
) -> ErrorDetails:
    loc = tuple(error["loc"])
    for size in range(len(loc), 0, -1):
        real = real_keys.get(loc[:size])
        if real is not None:
            return {**error, "loc": (*loc[: size - 1], real, *loc[size:])}
    return error


def _problem_from_error(
    error: ErrorDetails, file: str | None, allowed_keys: Mapping[str, Sequence[str]]
) -> Problem:
    loc = list(error["loc"])
    ctx = error.get("ctx") or {}
    kind = error["type"]
    value = error.get("input", MISSING)
    if len(loc) >= 2 and loc[-1] == "[key]":
        # A table's key (not its value) is wrong: pydantic's loc spells the key lossily when it is
        # not valid UTF-8, while the input is the key itself.
        loc = [*loc[:-2], value if isinstance(value, str) else loc[-2]]
        message = ctx.get("message") if kind == SPEC_ERROR_TYPE else _TYPE_MESSAGES.get(kind)
        fix = ctx.get("fix") if kind == SPEC_ERROR_TYPE else _example_fix(_schema_path(loc))
        message = message or _generic_message(kind, ctx, error["msg"])
        return Problem(file, dotted_key(loc), MISSING, f"the name {message}", str(fix))
    if kind == SPEC_ERROR_TYPE:
        sub_key = ctx.get("key")
        if isinstance(sub_key, (str, int)) and sub_key != "":
            loc.append(sub_key)
            value = _sub_value(value, sub_key)
        return Problem(file, dotted_key(loc), value, str(ctx["message"]), str(ctx["fix"]))
    if kind == "extra_forbidden":
        return _unknown_key_problem(loc, value, file, allowed_keys)
    schema_path = _schema_path(loc)
    if kind == "missing":
        value = MISSING
    message = _TYPE_MESSAGES.get(kind) or _generic_message(kind, ctx, error["msg"])
    return Problem(file, dotted_key(loc), value, message, _example_fix(schema_path))


def _sub_value(value: Any, key: str | int) -> Any:
    if isinstance(key, int):
        return value[key] if isinstance(value, list) and 0 <= key < len(value) else MISSING
    if isinstance(value, dict):
        return value.get(key, MISSING)
    return getattr(value, key, MISSING)


def _generic_message(kind: str, ctx: Mapping[str, Any], msg: str) -> str:
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}"
    if kind == "greater_than":
        return f"must be greater than {ctx['gt']}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    # Pydantic's wording, made to read as a continuation of "<key> = <value>: ".
    return re.sub(r"^Input should be", "must be", msg)


def _unknown_key_problem(
    loc: Sequence[int | str],
    value: Any,
    file: str | None,
    allowed_keys: Mapping[str, Sequence[str]],
) -> Problem:
    key = str(loc[-1])
    parent = _schema_path(loc[:-1])
    allowed = list(allowed_keys.get(parent, ()))
    where = f" in [{parent}]" if parent else ""
    message = f"unknown key{where}"
    synonym = _SYNONYMS.get(parent, {}).get(key.lower())
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if synonym:
        fix = f"did you mean {synonym}?"
    elif close:
        fix = f"did you mean {close[0]}?"
    else:
        fix = f"valid keys{where}: {', '.join(sorted(allowed))}"
    return Problem(file, dotted_key(loc), value, message, fix)
