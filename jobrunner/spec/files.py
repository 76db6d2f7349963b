"""``[[files]]`` entries: files placed inside the machine before the command starts.

Each entry has an absolute ``guest_path`` and exactly one source: ``content`` (text in the job
file), ``source`` (a local file, relative to the job file's folder, read at load time and sent
base64) or ``secret_name`` (a Fly app secret holding base64). The bytes of ``content`` and
``source`` files are kept in ``raw_value``, so a run's snapshot replays without the local file.
"""

from __future__ import annotations

import base64
import re
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

__all__ = ["FILE_KEYS", "JobFile"]

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


def _resolve(source: str, base_dir: Path | None) -> Path:
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _read_source(path: Path) -> bytes:
    try:
        return path.read_bytes()
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
