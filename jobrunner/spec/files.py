"""``[[files]]`` entries: files placed inside the machine before the command starts.

Each entry has an absolute ``guest_path`` and exactly one source: ``content`` (text in the job
file), ``source`` (a local file, relative to the job file's folder and inside it or a folder of
``$JOBRUNNER_FILES_ROOT``, read at load time and sent base64) or ``secret_name`` (a Fly app
secret holding base64).

A run's snapshot keeps the bytes of ``content`` and ``source`` files, so it replays without the
local file: small ones (up to ``INLINE_MAX_BYTES``) inline (``content``, or base64
``raw_value``), larger ones by ``sha256`` and ``size`` only, their bytes stored once in the
ledger's content-addressed blob store (``Job.snapshot()`` hands the bytes to the ledger beside
the snapshot; the runner fetches them back when it builds the machine config).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jobrunner.machines.models import File
from jobrunner.spec.problems import Utf8Str, spec_error
from jobrunner.spec.text import utf8_problem

__all__ = [
    "FILES_ROOT_VARIABLE",
    "FILE_KEYS",
    "INLINE_MAX_BYTES",
    "MAX_FILE_BYTES",
    "BlobMissing",
    "JobFile",
    "files_roots",
]

# Extra folders (besides the job file's own) that ``source`` files may be read from.
FILES_ROOT_VARIABLE = "JOBRUNNER_FILES_ROOT"
# The most bytes one file may hold (the local backend refuses more: local/api/validate.py).
MAX_FILE_BYTES = 4 * 1024 * 1024
# Files up to this size stay inline in a run's snapshot; larger ones go to the blob store once.
INLINE_MAX_BYTES = 16 * 1024

# The keys a user may write in a [[files]] entry (raw_value is jobrunner's own).
FILE_KEYS = ("guest_path", "content", "source", "secret_name", "mode")
_SOURCES = ("content", "source", "secret_name")
_SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OCTAL = re.compile(r"(?:0o|0)?([0-7]{1,4})")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BlobMissing(LookupError):
    """A file's bytes are in the ledger's blob store, and were not given to build the config."""

    def __init__(self, guest_path: str, sha256: str) -> None:
        super().__init__(
            f"the contents of {guest_path} (sha256 {sha256}) are not at hand: they are read "
            "from the ledger's blob store when the machine is created"
        )
        self.guest_path = guest_path
        self.sha256 = sha256


class JobFile(BaseModel):
    """One file to place in the machine."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    guest_path: Utf8Str
    content: Utf8Str | None = None
    source: str | None = None
    secret_name: str | None = None
    mode: int | None = None
    # The bytes of content/source files, as snapshots record them: inline base64 (``raw_value``,
    # small files and snapshots from before the blob store; decoded at validation), or the
    # digest and size of a blob in the ledger. Accepted as input only when rebuilding from a
    # snapshot (validation context {"snapshot": True}); sha256 and size are filled in otherwise.
    raw_value: Utf8Str | None = Field(default=None, repr=False)
    sha256: str | None = None
    size: int | None = None

    # The bytes of a ``source`` file (read at load time, or decoded from an inline snapshot);
    # None for content files (their text is the bytes) and for files stored as blobs.
    _data: bytes | None = PrivateAttr(default=None)

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
        snapshot = bool(context.get("snapshot"))
        if not snapshot:
            for key in ("raw_value", "sha256", "size"):
                if getattr(entry, key) is not None:
                    raise spec_error(
                        "is set by jobrunner itself", "use content, source or secret_name", key=key
                    )
        if (entry.sha256 is None) != (entry.size is None):
            raise spec_error("a stored file needs both sha256 and size", "keep both", key="sha256")
        if entry.sha256 is not None and (
            not _SHA256.fullmatch(entry.sha256) or entry.size is None or entry.size < 0
        ):
            raise spec_error("is not a sha256 digest", "64 lowercase hex digits", key="sha256")
        given = [name for name in _SOURCES if getattr(entry, name) is not None]
        # A large content file's snapshot holds only its digest: the blob is its one source.
        stored_only = entry.sha256 is not None and not given and entry.raw_value is None
        if len(given) != 1 and not stored_only:
            found = f"it has {' and '.join(given)}" if given else "it has none"
            raise spec_error(
                f"a file needs exactly one of content, source or secret_name; {found}",
                "keep exactly one of them"
                if given
                else 'add content = "..." (or source, or secret_name)',
            )
        if entry.secret_name is not None:
            return entry
        if entry.content is not None:
            encoded = entry.content.encode()
            return entry.model_copy(
                update={
                    "raw_value": None,
                    "sha256": hashlib.sha256(encoded).hexdigest(),
                    "size": len(encoded),
                }
            )
        raw: bytes | None = None
        if entry.raw_value is not None:  # an inline snapshot (or one from before blobs)
            try:
                raw = base64.b64decode(entry.raw_value, validate=True)
            except ValueError:
                raise spec_error(
                    "is not base64",
                    "the recorded run is damaged: submit the job again",
                    key="raw_value",
                ) from None
        elif entry.source is not None and entry.sha256 is None:
            base_dir = context.get("base_dir")
            raw = _read_source(_resolve(entry.source, Path(base_dir) if base_dir else None))
        if raw is None:
            return entry  # bytes in the ledger's blob store
        copied = entry.model_copy(
            update={"raw_value": None, "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
        )
        copied._data = raw
        return copied

    @property
    def data(self) -> bytes | None:
        """The file's bytes when this process has them (None for a secret, or for a file whose
        bytes are in the ledger's blob store: see :attr:`blob_digest`)."""
        if self.content is not None:
            return self.content.encode()
        return self._data

    @property
    def blob_digest(self) -> str | None:
        """The sha256 of bytes that must be fetched from the blob store to build the config."""
        if self.secret_name is not None or self.content is not None or self._data is not None:
            return None
        return self.sha256

    def to_api(self, blobs: Mapping[str, bytes] | None = None) -> File:
        """The Machines API file (``raw_value`` base64, or ``secret_name``); the bytes of a file
        rebuilt from a snapshot by digest come from ``blobs`` (sha256 -> bytes), else
        :class:`BlobMissing`."""
        if self.secret_name is not None:
            return File(guest_path=self.guest_path, secret_name=self.secret_name, mode=self.mode)
        raw = self.data
        if raw is None:
            assert self.sha256 is not None
            raw = (blobs or {}).get(self.sha256)
            if raw is None:
                raise BlobMissing(self.guest_path, self.sha256)
        encoded = base64.b64encode(raw).decode("ascii")
        return File(guest_path=self.guest_path, raw_value=encoded, mode=self.mode)

    def snapshot(self) -> tuple[dict[str, Any], tuple[str, Callable[[], bytes]] | None]:
        """The JSON-safe form, and the blob it refers to (``(sha256, bytes loader)``) or None.

        Up to ``INLINE_MAX_BYTES`` the bytes stay inline (``content`` as text, a ``source``
        file's as base64 ``raw_value``); larger files are recorded by ``sha256`` and ``size``
        only, and their bytes go to the blob store once, whatever the number of runs."""
        data = self.model_dump(mode="json", exclude_none=True, exclude={"raw_value"})
        if self.secret_name is not None:
            return data, None
        if self.size is not None and self.size <= INLINE_MAX_BYTES and self.blob_digest is None:
            data.pop("sha256", None)
            data.pop("size", None)
            if self.content is None and self._data is not None:
                data["raw_value"] = base64.b64encode(self._data).decode("ascii")
            return data, None
        data.pop("content", None)
        if self.blob_digest is not None or self.sha256 is None:
            return data, None  # already in the blob store (this file came from a snapshot)
        return data, (self.sha256, self._loader())

    def _loader(self) -> Callable[[], bytes]:
        if self.content is not None:
            content = self.content
            return content.encode
        held = self._data
        assert held is not None
        return lambda: held


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
