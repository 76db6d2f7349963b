"""Checks on request bodies and query parameters, turning bad input into 400/422 answers.

Parsing is done with the shared models (``jobrunner.machines.models``) so the client and the
server agree on one definition; this module adds the rules the models cannot express (section 8 of
fly-machines-api.md): an image is required, guest sizes have per-CPU memory limits, file paths are
absolute, ``raw_value`` is base64, restart policies and schedules come from fixed lists. Every
message names the field at fault, because the user reading it has to find that field.

Malformed JSON and wrong JSON types answer 400; well-typed but invalid values answer 422
(Fly's "Validation failed").
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import signal as signal_module
from collections.abc import Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from jobrunner.local.api.errors import ApiError, bad_request, unprocessable
from jobrunner.machines.models import File, Guest, MachineConfig, Restart

__all__ = [
    "MAX_BODY_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_INT_DIGITS",
    "RESTART_POLICIES",
    "SCHEDULES",
    "parse_body",
    "parse_bool",
    "parse_duration",
    "parse_json_object",
    "parse_signal",
    "restart_policy",
    "validate_config",
]

M = TypeVar("M", bound=BaseModel)

RESTART_POLICIES = ("no", "always", "on-failure")
SCHEDULES = ("hourly", "daily", "weekly", "monthly")
DEFAULT_MAX_RETRIES = 10

# Memory limits per CPU in MB (fly-go constants; DOC machine-sizing).
_MEMORY_PER_CPU = {"shared": (256, 2048), "performance": (2048, 8192)}
_MEMORY_STEP_MB = 256
_MAX_CPUS = 16

_GPU_PRESETS = ("a100-40gb", "a100-80gb", "l40s", "a10")


def _size_presets() -> dict[str, tuple[str, int, int]]:
    presets: dict[str, tuple[str, int, int]] = {}
    for n in (1, 2, 4, 6, 8):
        presets[f"shared-cpu-{n}x"] = ("shared", n, n * 256)
    for n in (1, 2, 4, 6, 8, 10, 12, 14, 16):
        presets[f"performance-{n}x"] = ("performance", n, n * 2048)
    for gpu in _GPU_PRESETS:
        presets[gpu] = ("performance", 8, 32768)
    return presets


SIZE_PRESETS = _size_presets()

_SIGNAL_NAMES = {
    name: int(getattr(signal_module, name))
    for name in (
        "SIGABRT", "SIGALRM", "SIGFPE", "SIGHUP", "SIGILL", "SIGINT", "SIGKILL", "SIGPIPE",
        "SIGQUIT", "SIGSEGV", "SIGTERM", "SIGTRAP", "SIGUSR1", "SIGUSR2", "SIGCONT", "SIGSTOP",
        "SIGWINCH",
    )
}  # fmt: skip

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}  # fmt: skip
# Real machine configs nest about ten levels deep. Far deeper bodies are refused up front: they
# would otherwise fail later, with a 500, in the decoder or in the models' serialiser.
MAX_BODY_DEPTH = 64
_TOO_DEEP = f"request body nests lists/objects more than {MAX_BODY_DEPTH} levels deep: flatten it"
# JSON numbers: Fly's fields are Go int64/uint64 and float64.
MAX_INT_DIGITS = 20
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")
# The decoded bytes of one config.files entry (raw_value is base64, a third larger). Keep in
# step with jobrunner.spec.files.MAX_FILE_BYTES, which refuses such files at load time.
MAX_FILE_BYTES = 4 * 1024 * 1024
# A bare number is seconds per DOC, but fly-go's parser reads numbers as nanoseconds. No one
# means a stop grace period of 11 days, so numbers this large are taken as nanoseconds.
_NANOSECOND_THRESHOLD = 1_000_000


class _BadNumber(ValueError):
    """A JSON number no Machines API field can hold (raised from inside the decoder)."""


def _parse_int(text: str) -> int:
    # Checked before int(): Python refuses to convert more than 4,300 digits (a ValueError that
    # used to surface as a 500), and fields are 64-bit on Fly (Go) anyway.
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS or not _INT_MIN <= (value := int(text)) <= _INT_MAX:
        shown = text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"
        raise _BadNumber(f"the number {shown} is out of range: whole numbers must fit in 64 bits")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"
        raise _BadNumber(f"the number {shown} is out of range for a 64-bit float")
    return value


def _parse_constant(name: str) -> float:
    # Python's decoder takes NaN and Infinity; JSON has neither, and answers holding one would
    # not be JSON either.
    raise _BadNumber(f"{name} is not a JSON number")


def parse_json_object(raw: bytes, *, required: bool = True) -> dict[str, Any]:
    """Decode a JSON object request body; 400 when it is empty (and required), not JSON, not
    an object, nested deeper than ``MAX_BODY_DEPTH``, holding a number no field can take or a
    string that is not valid Unicode (``"\\ud800"``). An empty optional body is ``{}``.

    Whatever passes can be stored, and answered back as JSON, without failing.
    """
    if not raw.strip():
        if required:
            raise bad_request("request body is empty: send a JSON object")
        return {}
    try:
        data = json.loads(
            raw,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except _BadNumber as exc:
        raise bad_request(f"request body: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # the decoder gives up on very deep nesting before any check of ours
        raise bad_request(_TOO_DEEP) from None
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, not {type(data).__name__}")
    _check_tree(data)
    return data


def _check_tree(value: object) -> None:
    """400 when lists and objects nest more than ``MAX_BODY_DEPTH`` deep, or a key or string
    holds a lone surrogate (JSON's ``\\ud800`` escape decodes to one; it cannot be encoded as
    UTF-8, so storing it would make every later answer holding it fail). Iterative: no
    recursion limit to hit."""
    pending: list[tuple[object, int, tuple[str | int, ...]]] = [(value, 1, ())]
    while pending:
        item, depth, path = pending.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                raise bad_request(_surrogate_message(path, "value"))
            continue
        if isinstance(item, dict):
            children: Iterable[tuple[str | int, object]] = item.items()
            for key in item:
                if not key.isascii() and _SURROGATE.search(key):
                    raise bad_request(_surrogate_message((*path, key), "key"))
        elif isinstance(item, list):
            children = enumerate(item)
        else:
            continue
        if depth > MAX_BODY_DEPTH:
            raise bad_request(_TOO_DEEP)
        pending.extend((child, depth + 1, (*path, key)) for key, child in children)


def _surrogate_message(path: tuple[str | int, ...], what: str) -> str:
    field = _field_name(path)
    return (
        f"{field}: the {what} is not valid Unicode text (it holds a lone surrogate such as "
        "\\ud800, which cannot be encoded as UTF-8): send UTF-8 text only"
    )


def _field_name(path: tuple[str | int, ...]) -> str:
    parts: list[str] = []
    for part in path:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            shown = part.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
            parts.append(("." if parts else "") + shown)
    return "".join(parts) or "body"


def parse_body(raw: bytes, model: type[M], *, required: bool = True) -> M:
    """Decode a JSON request body into ``model``; 400 naming the field when it does not fit."""
    data = parse_json_object(raw, required=required)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise bad_request(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field by its dotted path."""
    problems = []
    for error in exc.errors(include_url=False)[:5]:
        field = ".".join(str(part) for part in error["loc"]) or "body"
        problems.append(f"{field}: {error['msg']}")
    more = exc.error_count() - len(problems)
    suffix = f" (and {more} more)" if more > 0 else ""
    return "invalid request: " + "; ".join(problems) + suffix


def validate_config(config: MachineConfig) -> MachineConfig:
    """Check ``config`` against fly-machines-api.md section 8; 422 naming the first fault.

    Returns the config as stored: guest filled in (from ``size`` or the defaults), restart policy
    spelled the API way.
    """
    if not isinstance(config.image, str) or not config.image.strip():
        raise unprocessable("config.image is required: name the image the machine runs")
    guest = _validate_guest(config)
    _validate_env_and_argv(config)
    files = [_validate_file(i, f) for i, f in enumerate(config.files or [])]
    policy, _ = restart_policy(config)
    if config.schedule not in (None, "") and config.schedule not in SCHEDULES:
        raise unprocessable(
            f"config.schedule {config.schedule!r} is not supported: use one of "
            + ", ".join(SCHEDULES)
        )
    if config.stop_config is not None:
        if config.stop_config.signal is not None:
            parse_signal(config.stop_config.signal, field="config.stop_config.signal", status=422)
        if config.stop_config.timeout is not None:
            parse_duration(
                config.stop_config.timeout, field="config.stop_config.timeout", status=422
            )
    # No init command is fine, as on Fly (image is the only required field): the image's own
    # ENTRYPOINT/CMD come from the local image catalog at boot (images.py).
    return config.model_copy(
        update={
            "guest": guest,
            "files": files or config.files,
            "restart": _normalised_restart(config.restart, policy),
        }
    )


def _validate_guest(config: MachineConfig) -> Guest:
    base: dict[str, Any] = {}
    if config.size is not None:
        preset = SIZE_PRESETS.get(config.size)
        if preset is None:
            raise unprocessable(
                f"config.size {config.size!r} is not a known preset: use e.g. shared-cpu-1x, "
                "shared-cpu-2x, performance-1x (or give config.guest instead)"
            )
        base = {"cpu_kind": preset[0], "cpus": preset[1], "memory_mb": preset[2]}
        if config.size in _GPU_PRESETS:
            base.update(gpus=1, gpu_kind=config.size)
    given = config.guest.to_api() if config.guest is not None else {}
    merged = {**base, **given}  # explicit guest fields win over the size preset
    cpu_kind = merged.setdefault("cpu_kind", "shared")
    if cpu_kind not in _MEMORY_PER_CPU:
        raise unprocessable(
            f"config.guest.cpu_kind {cpu_kind!r} is not supported: use 'shared' or 'performance'"
        )
    cpus = merged.setdefault("cpus", 1)
    if not 1 <= cpus <= _MAX_CPUS:
        raise unprocessable(f"config.guest.cpus must be between 1 and {_MAX_CPUS}, got {cpus}")
    low, high = (limit * cpus for limit in _MEMORY_PER_CPU[cpu_kind])
    memory = merged.setdefault("memory_mb", low)
    if memory % _MEMORY_STEP_MB != 0:
        raise unprocessable(
            f"config.guest.memory_mb must be a multiple of {_MEMORY_STEP_MB}, got {memory}"
        )
    if not low <= memory <= high:
        raise unprocessable(
            f"config.guest.memory_mb {memory} is out of range for {cpus} {cpu_kind} CPU(s): "
            f"use {low} to {high} MB"
        )
    return Guest.model_validate(merged)


def _validate_env_and_argv(config: MachineConfig) -> None:
    """Refuse what no process can be given: checked here so the 422 names the field, instead of
    the machine failing later with an exit event that cannot say which variable was at fault."""
    for name, value in (config.env or {}).items():
        if not name or "=" in name or "\0" in name:
            raise unprocessable(
                f"config.env has an invalid variable name {name!r}: names must be non-empty and "
                "contain no '=' or NUL character"
            )
        if "\0" in value:
            raise unprocessable(
                f"config.env.{name} contains a NUL character, which no process environment can "
                "hold: remove it"
            )
    for part in ("exec", "entrypoint", "cmd"):
        for index, argument in enumerate(getattr(config.init, part, None) or []):
            if "\0" in argument:
                raise unprocessable(
                    f"config.init.{part}[{index}] contains a NUL character, which no command "
                    "line can hold: remove it"
                )


def _validate_file(index: int, file: File) -> File:
    field = f"config.files[{index}]"
    if not file.guest_path.startswith("/"):
        raise unprocessable(
            f"{field}.guest_path {file.guest_path!r} must be an absolute path (start with /)"
        )
    if (file.raw_value is None) == (file.secret_name is None):
        raise unprocessable(f"{field}: set exactly one of raw_value and secret_name")
    if file.raw_value is not None:
        decoded = len(file.raw_value) // 4 * 3
        if decoded > MAX_FILE_BYTES:
            raise ApiError(
                413,
                f"{field}.raw_value holds about {decoded / 1048576:.1f} MiB; a file may hold at "
                f"most {MAX_FILE_BYTES // 1048576} MiB: put larger data in a volume or the image",
            )
        try:
            base64.b64decode(file.raw_value, validate=True)
        except (binascii.Error, ValueError):
            raise unprocessable(f"{field}.raw_value is not valid base64") from None
    if file.mode is not None and not 0 <= file.mode <= 0o7777:
        raise unprocessable(f"{field}.mode must be file permission bits (0 to 0o7777)")
    return file


def restart_policy(config: MachineConfig) -> tuple[str, int]:
    """The effective restart policy and max_retries of ``config``; 422 when they are invalid."""
    restart = config.restart or Restart()
    policy = restart.policy
    if policy in (None, ""):
        # Fly's platform default is on-failure; for auto_destroy machines flyctl sends "no", and
        # retrying a one-off job behind the caller's back is never what it wants (see docs).
        policy = "no" if config.auto_destroy else "on-failure"
    elif policy == "on-fail":  # flyctl's deprecated spelling
        policy = "on-failure"
    if policy not in RESTART_POLICIES:
        raise unprocessable(
            f"config.restart.policy {policy!r} is not supported: use one of "
            + ", ".join(RESTART_POLICIES)
        )
    max_retries = restart.max_retries if restart.max_retries is not None else DEFAULT_MAX_RETRIES
    if max_retries < 0:
        raise unprocessable(f"config.restart.max_retries must be 0 or more, got {max_retries}")
    return policy, max_retries


def _normalised_restart(restart: Restart | None, policy: str) -> Restart | None:
    if restart is None:
        return None  # leave it unset in the stored config, as the caller sent it
    return restart.model_copy(update={"policy": policy})


def parse_signal(value: object, *, field: str = "signal", status: int = 400) -> int:
    """A signal given by name (``SIGTERM``, ``TERM``) or number (``15``) -> its number."""
    if isinstance(value, bool):
        raise ApiError(status, f"{field} must be a signal name like SIGTERM or a number")
    if isinstance(value, int):
        if value in _SIGNAL_NAMES.values():
            return value
        raise ApiError(status, f"{field} {value} is not a supported signal number")
    if isinstance(value, str):
        name = value.strip().upper()
        if name.isdigit():
            return parse_signal(int(name), field=field, status=status)
        if not name.startswith("SIG"):
            name = "SIG" + name
        if name in _SIGNAL_NAMES:
            return _SIGNAL_NAMES[name]
        raise ApiError(
            status, f"{field} {value!r} is not a supported signal: use e.g. SIGINT, SIGTERM, 9"
        )
    raise ApiError(status, f"{field} must be a signal name like SIGTERM or a number")


def parse_duration(value: object, *, field: str = "timeout", status: int = 400) -> float:
    """A Go duration string (``"10s"``, ``"1m30s"``) or a number -> seconds.

    Numbers are seconds (DOC), except very large ones, which are nanoseconds (fly-go encodes
    ``time.Duration`` as nanoseconds).
    """
    if isinstance(value, bool):
        raise ApiError(status, f"{field} must be a duration like '10s' or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
        if seconds >= _NANOSECOND_THRESHOLD:
            seconds = seconds / 1e9
    elif isinstance(value, str):
        seconds = _parse_duration_text(value.strip(), field, status)
    else:
        raise ApiError(status, f"{field} must be a duration like '10s' or a number of seconds")
    if not math.isfinite(seconds) or seconds < 0:
        raise ApiError(status, f"{field} must be a finite duration, not negative")
    return seconds


def _parse_duration_text(text: str, field: str, status: int) -> float:
    try:
        return parse_duration(float(text), field=field, status=status)
    except ValueError:
        pass
    if not text or _DURATION_PART.sub("", text) != "":
        raise ApiError(
            status, f"{field} {text!r} is not a duration: use e.g. '10s', '500ms', '1m30s'"
        )
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


def parse_bool(value: str | None, *, field: str) -> bool:
    """A boolean query parameter; absent means false."""
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in ("", "1", "true", "t", "yes", "on"):  # a bare ``?force`` means true
        return True
    if lowered in ("0", "false", "f", "no", "off"):
        return False
    raise bad_request(f"query parameter {field}={value!r} must be true or false")
