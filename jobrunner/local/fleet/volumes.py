"""Volumes: the swagger's ``/v1/apps/{app}/volumes`` endpoints and ``config.mounts``.

A volume is a directory, ``<state dir>/volumes/<id>`` (mode 0700), that the launcher bind-mounts
at the mount's ``path`` inside the machine's private mount namespace (proc_files.bind_volumes).
As on Fly:

* a volume is attached to at most one machine at a time: a machine created (or updated) with a
  mount takes the volume, a second machine naming it is refused with 422, and destroying the
  machine (or updating it without the mount) frees it;
* a machine mounts at most one volume, and runs in the volume's region;
* an attached volume cannot be deleted.

``size_gb`` is recorded, and extended on request, but not enforced: the directory can grow past
it (``blocks*`` figures are derived from ``size_gb``). Snapshots are directory copies
(``<state dir>/volume-snapshots/<id>``), made on request only (no daily automatic snapshots), and
a volume can be created from one (``snapshot_id``) or forked from another volume
(``source_volume_id``). Volumes and snapshots persist in ``local.db`` (table ``volumes``).

Attachment is checked lazily: a volume whose machine has been destroyed (or purged) counts as
free, and is saved as such the next time anything looks at it.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import re
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jobrunner.local.api.errors import ApiError, bad_request, not_found, unprocessable
from jobrunner.local.api.validate import parse_body
from jobrunner.local.fleet.records import MachineRecord, parse_time, rfc3339
from jobrunner.machines.models import (
    CreateVolumeRequest,
    ExtendVolumeRequest,
    MachineConfig,
    UpdateVolumeRequest,
    Volume,
    VolumeSnapshot,
)

if TYPE_CHECKING:
    from jobrunner.local.fleet.registry import Registry

__all__ = [
    "SNAPSHOTS_DIR",
    "VOLUMES_DIR",
    "MountSpec",
    "SnapshotRecord",
    "VolumeRecord",
    "VolumeService",
    "volume_dir",
    "volume_routes",
]

VOLUMES_DIR = "volumes"
SNAPSHOTS_DIR = "volume-snapshots"
DEFAULT_SIZE_GB = 1
MAX_SIZE_GB = 500  # Fly's limit per volume
DEFAULT_SNAPSHOT_RETENTION = 5
BLOCK_SIZE = 4096
_VOLUME_NAME = re.compile(r"^[a-z0-9_]{1,30}$")
_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_GONE = ("destroying", "destroyed")


def volume_dir(state_dir: Path, volume_id: str) -> Path:
    """Where a volume's data lives on this computer."""
    return state_dir / VOLUMES_DIR / volume_id


def _new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(16))


@dataclass
class SnapshotRecord:
    id: str
    created_at: datetime
    size: int
    status: str = "created"

    def to_api(self) -> dict[str, Any]:
        snapshot = VolumeSnapshot(
            id=self.id,
            created_at=rfc3339(self.created_at),
            digest="",
            size=self.size,
            status=self.status,
        )
        return snapshot.to_api()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at.isoformat(),
            "size": self.size,
            "status": self.status,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SnapshotRecord:
        return cls(data["id"], parse_time(data["created_at"]), data["size"], data["status"])


@dataclass
class VolumeRecord:
    id: str
    app: str
    name: str
    region: str
    size_gb: int
    created_at: datetime
    encrypted: bool = True
    fstype: str = "ext4"
    state: str = "created"
    zone: str = "local"
    attached_machine_id: str | None = None
    attached_alloc_id: str | None = None
    auto_backup_enabled: bool = True
    snapshot_retention: int = DEFAULT_SNAPSHOT_RETENTION
    snapshots: list[SnapshotRecord] = field(default_factory=list)

    def to_api(self) -> dict[str, Any]:
        blocks = self.size_gb * (1 << 30) // BLOCK_SIZE
        volume = Volume(
            id=self.id,
            name=self.name,
            state=self.state,
            size_gb=self.size_gb,
            region=self.region,
            zone=self.zone,
            encrypted=self.encrypted,
            fstype=self.fstype,
            created_at=rfc3339(self.created_at),
            attached_machine_id=self.attached_machine_id,
            attached_alloc_id=self.attached_alloc_id,
            auto_backup_enabled=self.auto_backup_enabled,
            snapshot_retention=self.snapshot_retention,
            block_size=BLOCK_SIZE,
            blocks=blocks,
            blocks_avail=blocks,
            blocks_free=blocks,
        )
        return volume.to_api()

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("created_at", "snapshots")}
        data["created_at"] = self.created_at.isoformat()
        data["snapshots"] = [s.to_json() for s in self.snapshots]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeRecord:
        fields = dict(data)
        fields["created_at"] = parse_time(fields["created_at"])
        fields["snapshots"] = [SnapshotRecord.from_json(s) for s in fields.get("snapshots", [])]
        return cls(**fields)


@dataclass(frozen=True)
class MountSpec:
    """A volume directory on this computer and the path the machine sees it at."""

    source: Path
    path: str


class VolumeService:
    """The volumes of every app; loaded from the database on first use."""

    def __init__(self, registry: Registry, state_dir: Path) -> None:
        self._registry = registry
        self._store = registry.store
        self.state_dir = state_dir
        self._volumes: dict[str, VolumeRecord] | None = None

    @property
    def volumes(self) -> dict[str, VolumeRecord]:
        if self._volumes is None:
            self._volumes = {
                v.id: v for v in map(VolumeRecord.from_json, self._store.load_volumes())
            }
        return self._volumes

    # lookups
    def volume(self, app: str, volume_id: str) -> VolumeRecord:
        self._registry.app(app)
        volume = self.volumes.get(volume_id)
        if volume is None or volume.app != app:
            raise not_found(f"volume not found: {volume_id}")
        self._refresh_attachment(volume)
        return volume

    def _refresh_attachment(self, volume: VolumeRecord) -> None:
        """Free a volume whose machine is gone (destroyed, purged, or moved off the volume)."""
        machine_id = volume.attached_machine_id
        if machine_id is None:
            return
        machine = self._registry.machines.get(machine_id)
        if machine is None or machine.state in _GONE or volume.id not in _mounted_ids(machine):
            volume.attached_machine_id = None
            volume.attached_alloc_id = None
            self._save(volume)

    def _save(self, volume: VolumeRecord) -> None:
        self._store.save_volume(volume.id, volume.app, volume.to_json())

    # the endpoints
    def list_volumes(self, app: str) -> list[dict[str, Any]]:
        self._registry.app(app)
        found = sorted(
            (v for v in self.volumes.values() if v.app == app), key=lambda v: v.created_at
        )
        for volume in found:
            self._refresh_attachment(volume)
        return [v.to_api() for v in found]

    async def create(self, app: str, request: CreateVolumeRequest) -> dict[str, Any]:
        self._registry.app(app)
        name = request.name
        if not isinstance(name, str) or not _VOLUME_NAME.match(name):
            raise unprocessable(
                f"name {name!r} is invalid: a volume needs a name of lowercase letters, digits "
                'and underscores (at most 30 characters), e.g. "data"'
            )
        size = DEFAULT_SIZE_GB if request.size_gb is None else request.size_gb
        if not 1 <= size <= MAX_SIZE_GB:
            raise unprocessable(f"size_gb must be between 1 and {MAX_SIZE_GB}, got {size}")
        if request.fstype not in (None, "", "ext4"):
            raise unprocessable(f"fstype {request.fstype!r} is not supported: use ext4")
        retention = request.snapshot_retention
        if retention is not None and not 1 <= retention <= 60:
            raise unprocessable(f"snapshot_retention must be between 1 and 60, got {retention}")
        source = self._copy_source(app, request)
        volume = VolumeRecord(
            id=_new_id("vol_"),
            app=app,
            name=name,
            region=request.region or _default_region(),
            size_gb=size,
            created_at=self._registry.now(),
            encrypted=True if request.encrypted is None else request.encrypted,
            snapshot_retention=retention or DEFAULT_SNAPSHOT_RETENTION,
        )
        target = volume_dir(self.state_dir, volume.id)
        try:
            await asyncio.to_thread(_make_volume_dir, target, source)
        except OSError as exc:
            await asyncio.to_thread(shutil.rmtree, target, True)
            if source is None:
                raise ApiError(507, f"cannot make the volume's directory {target}: {exc}") from None
            what = "snapshot_id" if request.snapshot_id else "source_volume_id"
            raise unprocessable(f"{what}: cannot copy {source}: {exc.strerror or exc}") from None
        self.volumes[volume.id] = volume
        self._save(volume)
        return volume.to_api()

    def _copy_source(self, app: str, request: CreateVolumeRequest) -> Path | None:
        if request.snapshot_id and request.source_volume_id:
            raise unprocessable("give snapshot_id or source_volume_id, not both")
        if request.source_volume_id:
            source = self.volumes.get(request.source_volume_id)
            if source is None or source.app != app:
                raise unprocessable(
                    f"source_volume_id {request.source_volume_id!r}: no such volume in app {app!r}"
                )
            return volume_dir(self.state_dir, source.id)
        if request.snapshot_id:
            for volume in self.volumes.values():
                if volume.app == app and any(s.id == request.snapshot_id for s in volume.snapshots):
                    return self.state_dir / SNAPSHOTS_DIR / request.snapshot_id
            raise unprocessable(
                f"snapshot_id {request.snapshot_id!r}: no such snapshot of a volume of app {app!r}"
            )
        return None

    def get(self, app: str, volume_id: str) -> dict[str, Any]:
        return self.volume(app, volume_id).to_api()

    def update(self, app: str, volume_id: str, request: UpdateVolumeRequest) -> dict[str, Any]:
        volume = self.volume(app, volume_id)
        retention = request.snapshot_retention
        if retention is not None:
            if not 1 <= retention <= 60:
                raise bad_request(f"snapshot_retention must be between 1 and 60, got {retention}")
            volume.snapshot_retention = retention
        if request.auto_backup_enabled is not None:
            volume.auto_backup_enabled = request.auto_backup_enabled
        self._save(volume)
        return volume.to_api()

    def extend(self, app: str, volume_id: str, request: ExtendVolumeRequest) -> dict[str, Any]:
        volume = self.volume(app, volume_id)
        size = request.size_gb
        if size is None:
            raise bad_request("size_gb is required: the volume's new size in GB")
        if size <= volume.size_gb:
            raise unprocessable(
                f"size_gb {size} must be larger than the volume's current size "
                f"({volume.size_gb} GB): volumes can only grow"
            )
        if size > MAX_SIZE_GB:
            raise unprocessable(f"size_gb must be at most {MAX_SIZE_GB}, got {size}")
        volume.size_gb = size
        self._save(volume)
        return {"needs_restart": False, "volume": volume.to_api()}

    async def delete(self, app: str, volume_id: str) -> dict[str, Any]:
        volume = self.volume(app, volume_id)
        if volume.attached_machine_id is not None:
            raise ApiError(
                412,
                f"volume {volume.id} is attached to machine {volume.attached_machine_id}: destroy "
                "that machine (or update it without the mount) before deleting the volume",
            )
        await self._remove(volume)
        volume.state = "destroyed"
        return volume.to_api()

    async def _remove(self, volume: VolumeRecord) -> None:
        del self.volumes[volume.id]
        self._store.delete_volume(volume.id)
        paths = [volume_dir(self.state_dir, volume.id)]
        paths += [self.state_dir / SNAPSHOTS_DIR / s.id for s in volume.snapshots]
        for path in paths:
            await asyncio.to_thread(shutil.rmtree, path, True)

    def list_snapshots(self, app: str, volume_id: str) -> list[dict[str, Any]]:
        volume = self.volume(app, volume_id)
        return [s.to_api() for s in volume.snapshots]

    async def create_snapshot(self, app: str, volume_id: str) -> dict[str, Any]:
        volume = self.volume(app, volume_id)
        snapshot_id = _new_id("vs_")
        target = self.state_dir / SNAPSHOTS_DIR / snapshot_id
        try:
            size = await asyncio.to_thread(
                _copy_tree, volume_dir(self.state_dir, volume.id), target
            )
        except OSError as exc:
            await asyncio.to_thread(shutil.rmtree, target, True)
            raise ApiError(507, f"cannot copy volume {volume.id} to {target}: {exc}") from None
        snapshot = SnapshotRecord(snapshot_id, self._registry.now(), size)
        if volume.id not in self.volumes:  # deleted while the copy ran
            await asyncio.to_thread(shutil.rmtree, target, True)
            raise not_found(f"volume not found: {volume.id} was deleted during the snapshot")
        volume.snapshots.append(snapshot)
        self._save(volume)
        return snapshot.to_api()

    async def delete_app_volumes(self, app: str) -> None:
        """Remove every volume of ``app`` (its machines are destroyed already)."""
        for volume in [v for v in self.volumes.values() if v.app == app]:
            await self._remove(volume)

    # machines' mounts
    def check_mounts(
        self, app: str, config: MachineConfig, region: str | None, machine_id: str | None
    ) -> tuple[MachineConfig, str | None]:
        """Validate ``config.mounts`` for a machine (``machine_id``: an update of that machine).

        Returns the config with each mount completed from its volume (name, size_gb, encrypted,
        normalised path) and the region the machine must run in (the volume's), or 422 naming the
        field. Nothing is attached yet: see ``attach``.
        """
        mounts = config.mounts or []
        if not mounts:
            return config, region
        if len(mounts) > 1:
            raise unprocessable(
                f"config.mounts has {len(mounts)} entries: a machine can mount one volume"
            )
        completed = []
        for index, mount in enumerate(mounts):
            field_name = f"config.mounts[{index}]"
            volume_id = mount.get("volume")
            if not isinstance(volume_id, str) or not volume_id:
                raise unprocessable(
                    f"{field_name}.volume is required: the id (vol_...) of a volume of app "
                    f"{app!r}; create one with POST /v1/apps/{app}/volumes"
                )
            volume = self.volumes.get(volume_id)
            if volume is None or volume.app != app:
                raise unprocessable(
                    f"{field_name}.volume: volume {volume_id!r} not found in app {app!r}; list "
                    f"them with GET /v1/apps/{app}/volumes"
                )
            self._refresh_attachment(volume)
            holder = volume.attached_machine_id
            if holder is not None and holder != machine_id:
                raise unprocessable(
                    f"{field_name}.volume: volume {volume_id} is already attached to machine "
                    f"{holder}; a volume is attached to one machine at a time (destroy that "
                    "machine, or create another volume)"
                )
            path = _mount_path(mount.get("path"), f"{field_name}.path")
            if region and region != volume.region:
                raise unprocessable(
                    f"region {region!r} differs from the region of volume {volume_id} "
                    f"({volume.region!r}): a machine runs where its volume is"
                )
            region = volume.region
            completed.append(
                {
                    **mount,
                    "volume": volume.id,
                    "path": path,
                    "name": volume.name,
                    "size_gb": volume.size_gb,
                    "encrypted": volume.encrypted,
                }
            )
        return config.model_copy(update={"mounts": completed}), region

    def attach(self, machine: MachineRecord) -> None:
        """Give ``machine`` the volumes it mounts and free the ones it no longer mounts."""
        wanted = _mounted_ids(machine)
        for volume in self.volumes.values():
            if volume.id in wanted:
                volume.attached_machine_id = machine.id
                volume.attached_alloc_id = machine.instance_id
                self._save(volume)
            elif volume.attached_machine_id == machine.id:
                volume.attached_machine_id = None
                volume.attached_alloc_id = None
                self._save(volume)

    def mounts_for(self, machine: MachineRecord) -> list[MountSpec]:
        """The directories to bind into ``machine`` (ValueError: a volume has disappeared)."""
        found = []
        for mount in machine.config.mounts or []:
            volume_id = str(mount.get("volume"))
            source = volume_dir(self.state_dir, volume_id)
            if not source.is_dir():
                raise ValueError(f"volume {volume_id} has no directory at {source}")
            found.append(MountSpec(source, str(mount.get("path"))))
        return found


def _default_region() -> str:
    from jobrunner.local.fleet.machines import DEFAULT_REGION

    return DEFAULT_REGION


def _mounted_ids(machine: MachineRecord) -> set[str]:
    return {str(m.get("volume")) for m in machine.config.mounts or [] if isinstance(m, dict)}


def _mount_path(value: object, field_name: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise unprocessable(
            f"{field_name} must be an absolute path where the machine sees the volume, e.g. /data"
        )
    if "\0" in value or ".." in value.split("/"):
        raise unprocessable(f"{field_name} {value!r} must not contain NUL or '..'")
    path = posixpath.normpath(value)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    if path == "/":
        raise unprocessable(f"{field_name} cannot be '/': mount the volume at e.g. /data")
    return path


def _make_volume_dir(target: Path, source: Path | None) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if source is not None:
        _copy_tree(source, target)
    else:
        target.mkdir(mode=0o700)
    os.chmod(target, 0o700)


def _copy_tree(source: Path, target: Path) -> int:
    """Copy a directory (symlinks as links); returns the bytes of regular files copied."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copytree(source, target, symlinks=True)
    os.chmod(target, 0o700)
    total = 0
    for root, _dirs, files in os.walk(target):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total


# HTTP
def volume_routes(service: VolumeService) -> list[Route]:
    """The swagger's volume routes, one per path (so a 405 lists every method)."""
    base = "/v1/apps/{app}/volumes"
    one = base + "/{volume_id}"

    async def volumes(request: Request) -> Response:
        app = str(request.path_params["app"])
        if request.method == "POST":
            body = parse_body(await request.body(), CreateVolumeRequest)
            return JSONResponse(await service.create(app, body))
        return JSONResponse(service.list_volumes(app))

    async def volume(request: Request) -> Response:
        app, volume_id = _ids(request)
        if request.method == "POST":
            body = parse_body(await request.body(), UpdateVolumeRequest)
            return JSONResponse(service.update(app, volume_id, body))
        if request.method == "DELETE":
            return JSONResponse(await service.delete(app, volume_id))
        return JSONResponse(service.get(app, volume_id))

    async def extend(request: Request) -> Response:
        app, volume_id = _ids(request)
        body = parse_body(await request.body(), ExtendVolumeRequest)
        return JSONResponse(service.extend(app, volume_id, body))

    async def snapshots(request: Request) -> Response:
        app, volume_id = _ids(request)
        if request.method == "POST":
            return JSONResponse(await service.create_snapshot(app, volume_id))
        return JSONResponse(service.list_snapshots(app, volume_id))

    return [
        Route(base, volumes, methods=["GET", "POST"]),
        Route(one, volume, methods=["GET", "POST", "DELETE"]),
        Route(one + "/extend", extend, methods=["PUT"]),
        Route(one + "/snapshots", snapshots, methods=["GET", "POST"]),
    ]


def _ids(request: Request) -> tuple[str, str]:
    return str(request.path_params["app"]), str(request.path_params["volume_id"])
