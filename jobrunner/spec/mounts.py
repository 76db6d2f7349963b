"""``[[mounts]]`` entries: volumes the job's machine mounts.

Each entry names an existing volume of the app (``volume``: its name or its ``vol_...`` id) and
the absolute ``path`` the job sees it at. jobrunner sends them as ``config.mounts``; the machines
client looks names up (``fly machine run -v name:/path`` style) and fails with a message naming
the volume and how to create it when the app has none free. A machine mounts at most one volume,
as on Fly.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator

from jobrunner.spec.problems import spec_error

__all__ = ["MOUNT_KEYS", "JobMount", "JobMounts"]

MOUNT_KEYS = ("volume", "path")
# Fly volume names (lowercase letters, digits and '_', at most 30) or volume ids (vol_...).
_VOLUME = re.compile(r"[a-z0-9_]{1,30}|vol_[a-z0-9]{1,40}")


class JobMount(BaseModel):
    """One volume to mount in the machine."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    volume: str
    path: str

    @field_validator("volume")
    @classmethod
    def _volume(cls, value: str) -> str:
        if not _VOLUME.fullmatch(value):
            raise spec_error(
                "is not a volume name or id",
                'write the volume\'s name (lowercase letters, digits, "_"), e.g. volume = "data"',
            )
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise spec_error("must be an absolute path", 'write e.g. path = "/data"')
        if "\0" in value or ".." in value.split("/"):
            raise spec_error("must not contain '..' or NUL", 'write e.g. path = "/data"')
        if posixpath.normpath(value) in ("/", "//"):
            raise spec_error("cannot be '/'", 'mount the volume at e.g. path = "/data"')
        return value

    def to_api(self) -> dict[str, Any]:
        """The Machines API mount (``volume`` may still be a name: the client resolves it)."""
        return {"volume": self.volume, "path": self.path}


def _at_most_one(mounts: list[JobMount]) -> list[JobMount]:
    if len(mounts) > 1:
        raise spec_error(
            f"a machine mounts at most one volume (as on Fly); this job has {len(mounts)}",
            "keep one [[mounts]] entry",
        )
    return mounts


JobMounts = Annotated[list[JobMount], AfterValidator(_at_most_one)]
