"""The volumes endpoints (a base of ``AsyncMachinesClient``), and volume names in mounts.

A job names its volumes by name or id (``[[mounts]]`` in a job file); the Machines API takes only
ids in ``config.mounts[].volume``. ``resolve_mounts`` looks names up, as ``fly machine run -v
name:/path`` does: it needs an existing volume (nothing is created behind the user's back) and
picks one that no machine holds, preferring the machine's region.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from jobrunner.machines._base import ClientBase
from jobrunner.machines._requests import app_path, parse_model, parse_models
from jobrunner.machines.errors import MachinesError
from jobrunner.machines.models import CreateVolumeRequest, MachineConfig, Volume

__all__ = ["VolumeEndpoints", "VolumeNotFound", "pick_volume"]


class VolumeNotFound(MachinesError, ValueError):
    """A mount names a volume the app does not have (or only has attached to other machines)."""


def _volumes_path(app: str, *parts: str) -> str:
    tail = "".join(f"/{quote(part, safe='')}" for part in parts)
    return f"{app_path(app)}/volumes{tail}"


class VolumeEndpoints(ClientBase):
    """List, get, create and delete volumes; resolve volume names in ``config.mounts``."""

    async def list_volumes(self, *, app: str | None = None) -> list[Volume]:
        """The app's volumes (``GET /apps/{app}/volumes``)."""
        app = self._app(app)
        data = await self._json(
            "GET", _volumes_path(app), what="list volumes", action="volumes", scope=app
        )
        return parse_models(data, Volume, what="list volumes")

    async def get_volume(self, volume_id: str, *, app: str | None = None) -> Volume:
        """One volume by id; ``NotFound`` if the app has no such volume."""
        app = self._app(app)
        data = await self._json(
            "GET", _volumes_path(app, volume_id), what="get volume", action="volumes", scope=app
        )
        return parse_model(data, Volume, what="get volume")

    async def create_volume(
        self, name: str, *, size_gb: int | None = None, region: str | None = None,
        app: str | None = None,
    ) -> Volume:  # fmt: skip
        """Create a volume (not retried on an ambiguous failure: list first to check)."""
        app = self._app(app)
        body = CreateVolumeRequest(name=name, size_gb=size_gb, region=region).to_api()
        data = await self._json(
            "POST",
            _volumes_path(app),
            what="create volume",
            action="volumes",
            scope=app,
            idempotent=False,
            json=body,
        )
        return parse_model(data, Volume, what="create volume")

    async def delete_volume(self, volume_id: str, *, app: str | None = None) -> None:
        """Delete a volume; the API refuses while a machine has it attached."""
        app = self._app(app)
        await self._json(
            "DELETE",
            _volumes_path(app, volume_id),
            what="delete volume",
            action="volumes",
            scope=app,
        )

    async def resolve_mounts(
        self, config: MachineConfig, *, app: str, region: str | None = None
    ) -> MachineConfig:
        """``config`` with every mount's volume given by id (names looked up); unchanged when
        every mount already names a volume id of the app. Raises ``VolumeNotFound``."""
        mounts = config.mounts or []
        if not mounts:
            return config
        volumes = await self.list_volumes(app=app)
        resolved: list[dict[str, Any]] = []
        for mount in mounts:
            wanted = mount.get("volume")
            if not isinstance(wanted, str) or any(v.id == wanted for v in volumes):
                resolved.append(dict(mount))
                continue
            volume = pick_volume(volumes, wanted, app=app, region=region)
            resolved.append({**mount, "volume": volume.id})
        return config.model_copy(update={"mounts": resolved})


def pick_volume(volumes: list[Volume], name: str, *, app: str, region: str | None) -> Volume:
    """A free volume called ``name`` (in ``region`` when given); ``VolumeNotFound`` otherwise."""
    named = [v for v in volumes if v.name == name and v.state not in ("destroyed", "destroying")]
    if region:
        named = [v for v in named if v.region == region]
    where = f" in region {region!r}" if region else ""
    create = (
        f"create it first: `fly volumes create {name} --app {app}"
        + (f" --region {region}" if region else "")
        + f"` on Fly, or POST /v1/apps/{app}/volumes "
        + f'{{"name": "{name}"}} to the local backend'
    )
    if not named:
        raise VolumeNotFound(f"volume {name!r} not found in app {app!r}{where}: {create}")
    free = [v for v in named if not v.attached_machine_id]
    if not free:
        holders = ", ".join(sorted(str(v.attached_machine_id) for v in named))
        raise VolumeNotFound(
            f"every volume named {name!r} in app {app!r}{where} is attached to a machine "
            f"({holders}); a volume serves one machine at a time: wait for that machine to be "
            f"destroyed, or {create.replace('create it first', 'create another')}"
        )
    return min(free, key=lambda v: v.created_at or "")
