"""``[[files]]`` entries: files placed inside the machine before the command starts.

Each entry has an absolute ``guest_path`` and exactly one source: ``content`` (text in the job
file), ``source`` (a local file, relative to the job file's folder and inside it or a folder of
``$JOBRUNNER_FILES_ROOT``, read at load time and sent base64) or ``secret_name`` (a Fly app
secret holding base64). The bytes of ``content`` and ``source`` files are kept in ``raw_value``,
so a run's snapshot replays without the local file.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jobrunner.machines.models import File
from jobrunner.spec.problems import Utf8Str, spec_error
from jobrunner.spec.text import utf8_problem

__all__ = ["FILES_ROOT_VARIABLE", "FILE_KEYS", "MAX_FILE_BYTES", "JobFile", "files_roots"]

# Extra folders (besides the job file's own) that ``source`` files may be read from.
FILES_ROOT_VARIABLE = "JOBRUNNER_FILES_ROOT"
# The most bytes one file may hold (the local backend refuses more: local/validate.py).
MAX_FILE_BYTES = 4 * 1024 * 1024

# The keys a user may write in a [[files]] entry (raw_value is jobrunner's own).
FILE_KEYS = ("guest_path", "content", "source", "secret_name", "mode")
_SOURCES = ("content", "source", "secret_name")
_SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OCTAL = re.compile(r"(?:0o|0)?([0-7]{1,4})")


class JobFile(BaseModel):
    """One file to place in the machine."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    guest_path: Utf8Str
    content: Utf8Str | None = None
    source: str | None = None
    secret_name: str | None = None
    mode: int | None = None
    # Base64 of the bytes for content/source files. Filled in by validation; accepted as input
    # only when rebuilding from a snapshot (validation context {"snapshot": True}).
    raw_value: Utf8Str | None = Field(default=None, repr=False)

    @field_validator("guest_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise spec_error("must be an absolute path", f"write {'/' + value.lstrip('./')!r}")
        if value.endswith("/") or "\0" in value:
            raise spec_error("must name a file, not a folder", "write e.g. '/etc/app/config.json'")
        if ".." in value.split("/"):
            raise spec_error("must not contain '..'", "write the path without '..'")
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        # The file's bytes go base64, but its path is kept in the run's snapshot (JSON).
        problem = utf8_problem(value)
        if problem is not None:
            raise spec_error(problem, "rename the file (or its folder) to a UTF-8 name")
        return value

    @field_validator("secret_name")
    @classmethod
    def _secret_name(cls, value: str) -> str:
        if not _SECRET_NAME.fullmatch(value):
            raise spec_error(
                "is not a valid Fly secret name", "use letters, digits and '_' (e.g. APP_CONFIG)"
            )
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = _OCTAL.fullmatch(value.strip())
            if match is None:
                raise spec_error("is not an octal file mode", 'write e.g. mode = "0600" or "0644"')
            return int(match.group(1), 8)
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= 0o7777:
            raise spec_error(
                "is not a file mode (0 to 4095)", 'write the octal string, e.g. mode = "0600"'
            )
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _one_source(
        cls, data: Any, handler: ModelWrapValidatorHandler[JobFile], info: ValidationInfo
    ) -> JobFile:
        entry = handler(data)
        context = info.context or {}
        if entry.raw_value is not None and not context.get("snapshot"):
            raise spec_error(
                "is set by jobrunner itself", "use content, source or secret_name", key="raw_value"
            )
        given = [name for name in _SOURCES if getattr(entry, name) is not None]
        if len(given) != 1:
            found = f"it has {' and '.join(given)}" if given else "it has none"
            raise spec_error(
                f"a file needs exactly one of content, source or secret_name; {found}",
                "keep exactly one of them"
                if given
                else 'add content = "..." (or source, or secret_name)',
            )
        if entry.content is not None:
            encoded = base64.b64encode(entry.content.encode()).decode()
            return entry.model_copy(update={"raw_value": encoded})
        if entry.source is not None and entry.raw_value is None:
            base_dir = context.get("base_dir")
            path = _resolve(entry.source, Path(base_dir) if base_dir else None)
            encoded = base64.b64encode(_read_source(path)).decode()
            return entry.model_copy(update={"raw_value": encoded})
        return entry

    def to_api(self) -> File:
        """The Machines API file (``raw_value`` base64, or ``secret_name``)."""
        if self.secret_name is not None:
            return File(guest_path=self.guest_path, secret_name=self.secret_name, mode=self.mode)
        return File(guest_path=self.guest_path, raw_value=self.raw_value, mode=self.mode)

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe form; ``raw_value`` is kept for ``source`` files only (content holds it)."""
        data = self.model_dump(mode="json", exclude_none=True)
        if self.content is not None:
            data.pop("raw_value", None)
        return data


def files_roots(base_dir: Path | None, environ: Mapping[str, str] | None = None) -> list[Path]:
    """The folders ``source`` files may come from: the job file's folder (the current folder
    for a job built without one) and each folder of ``$JOBRUNNER_FILES_ROOT`` (``:``-separated,
    absolute), all with symlinks resolved."""
    env = os.environ if environ is None else environ
    roots = [(base_dir or Path.cwd()).resolve()]
    for raw in (env.get(FILES_ROOT_VARIABLE) or "").split(os.pathsep):
        if raw.strip():
            roots.append(Path(raw.strip()).expanduser().resolve())
    return roots


def _resolve(source: str, base_dir: Path | None) -> Path:
    """The real path of ``source``, which must lie inside one of :func:`files_roots`.

    Like a container build context: a job file must not pick up any file of the computer it is
    loaded on (``../../etc/passwd``, or a symlink pointing out of the folder).
    """
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise spec_error(
            f"cannot resolve {str(path)!r}: {exc}", "fix the path or the symlink", key="source"
        ) from None
    roots = files_roots(base_dir)
    if not any(real.is_relative_to(root) for root in roots):
        where = str(roots[0]) + (" or " + ", ".join(map(str, roots[1:])) if roots[1:] else "")
        raise spec_error(
            f"{str(real)!r} is outside the job file's folder ({where})",
            "move the file next to the job file, or allow its folder explicitly with "
            f"{FILES_ROOT_VARIABLE}=/that/folder",
            key="source",
        )
    return real


def _read_source(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise spec_error(
            f"file not found: {str(path)!r}",
            "create it, or fix the path (relative paths start at the job file's folder)",
            key="source",
        ) from None
    except IsADirectoryError:
        raise spec_error(
            f"{str(path)!r} is a folder", "point source at a single file", key="source"
        ) from None
    except OSError as exc:
        raise spec_error(
            f"cannot read {str(path)!r}: {exc.strerror}",
            "check the file's permissions",
            key="source",
        ) from None
    if len(data) > MAX_FILE_BYTES:
        raise spec_error(
            f"{str(path)!r} is larger than {MAX_FILE_BYTES // 1048576} MiB, the most a file "
            "may hold",
            "put large data in the image or a volume",
            key="source",
        )
    return data
