"""What the local backend remembers about apps and machines, and how it shows them as API JSON.

A ``MachineRecord`` holds everything that survives a server restart (it is persisted as one JSON
document per machine; events are stored as rows beside it). The API shapes are built with the
shared models, so what the server sends is exactly what the client parses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from jobrunner.machines.models import (
    ImageRef,
    LeaseData,
    Machine,
    MachineConfig,
    MachineEvent,
)

__all__ = [
    "AppRecord",
    "EventRecord",
    "LeaseRecord",
    "MachineRecord",
    "VersionRecord",
    "image_ref_for",
    "rfc3339",
]

# How many events a machine GET carries (newest first); /events has all that are kept.
MACHINE_EVENTS_SHOWN = 50


def rfc3339(moment: datetime) -> str:
    """``2024-01-01T00:00:00Z`` (seconds precision, UTC), as Fly writes created_at/updated_at."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_ms(moment: datetime) -> str:
    """``2024-01-01T00:00:00.123Z``, as Fly writes ``exited_at``."""
    text = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return text[:-3] + "Z"


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def image_ref_for(image: str) -> ImageRef:
    """Split an image reference the way a registry client would (the image is never pulled)."""
    rest, _, digest = image.partition("@")
    registry = "registry-1.docker.io"
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, rest = first, remainder
    name, tag = rest, "latest"
    last_colon = rest.rfind(":")
    if last_colon > rest.rfind("/"):
        name, tag = rest[:last_colon], rest[last_colon + 1 :]
    if registry == "registry-1.docker.io" and "/" not in name:
        name = f"library/{name}"
    return ImageRef(registry=registry, repository=name, tag=tag, digest=digest or None, labels={})


@dataclass
class AppRecord:
    name: str
    org_slug: str
    network: str
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "org_slug": self.org_slug,
            "network": self.network,
            "created_at": self.created_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AppRecord:
        return cls(
            name=data["name"],
            org_slug=data["org_slug"],
            network=data["network"],
            created_at=parse_time(data["created_at"]),
        )


@dataclass
class LeaseRecord:
    nonce: str
    expires_at: int  # Unix seconds, on the server's clock
    owner: str
    description: str
    version: str

    def to_api(self) -> dict[str, Any]:
        data = LeaseData(
            nonce=self.nonce,
            expires_at=self.expires_at,
            owner=self.owner,
            description=self.description,
            version=self.version,
        )
        return {"status": "success", "data": data.to_api()}

    def to_json(self) -> dict[str, Any]:
        return {
            "nonce": self.nonce,
            "expires_at": self.expires_at,
            "owner": self.owner,
            "description": self.description,
            "version": self.version,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LeaseRecord:
        return cls(**data)


@dataclass
class VersionRecord:
    """One version of a machine's config; every update adds one and marks the old one replaced."""

    version: str
    user_config: dict[str, Any]
    replaced: bool = False

    def to_api(self) -> dict[str, Any]:
        return {"version": self.version, "user_config": self.user_config}


@dataclass
class EventRecord:
    """A machine event plus ``seq``, the server's order of changes (for wait's from_event_id)."""

    event: MachineEvent
    seq: int

    def to_api(self) -> dict[str, Any]:
        return self.event.to_api()


@dataclass
class MachineRecord:
    """A machine as the server keeps it. ``events`` is newest first."""

    id: str
    app: str
    name: str
    region: str
    state: str
    instance_id: str
    private_ip: str
    created_at: datetime
    updated_at: datetime
    config: MachineConfig
    image_ref: ImageRef
    cordoned: bool = False
    lease: LeaseRecord | None = None
    versions: list[VersionRecord] = field(default_factory=list)
    restart_count: int = 0
    pid: int | None = None
    pid_started_at: datetime | None = None  # tells a reused pid from the machine's process
    # True while a boot is owed: created without skip_launch, or started, and not yet running.
    boot_pending: bool = False
    state_seq: int = 0  # the seq at which ``state`` was entered
    next_seq: int = 1
    destroyed_at: datetime | None = None
    schedule_fired_at: datetime | None = None
    events: list[EventRecord] = field(default_factory=list)

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def to_api(self, *, include_nonce: str | None = None) -> dict[str, Any]:
        """The ``Machine`` JSON of section 3.2."""
        machine = Machine(
            id=self.id,
            name=self.name,
            state=self.state,
            region=self.region,
            instance_id=self.instance_id,
            version=self.instance_id,
            private_ip=self.private_ip,
            created_at=rfc3339(self.created_at),
            updated_at=rfc3339(self.updated_at),
            image_ref=self.image_ref,
            config=self.config,
            events=[record.event for record in self.events[:MACHINE_EVENTS_SHOWN]],
            checks=[],
            nonce=include_nonce,
            host_status="ok",
            cordoned=self.cordoned,
        )
        return machine.to_api()

    def to_json(self) -> dict[str, Any]:
        """Everything but the events, for persistence."""
        return {
            "id": self.id,
            "app": self.app,
            "name": self.name,
            "region": self.region,
            "state": self.state,
            "instance_id": self.instance_id,
            "private_ip": self.private_ip,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "config": self.config.to_api(),
            "image_ref": self.image_ref.to_api(),
            "cordoned": self.cordoned,
            "lease": self.lease.to_json() if self.lease else None,
            "versions": [v.__dict__ for v in self.versions],
            "restart_count": self.restart_count,
            "pid": self.pid,
            "pid_started_at": self.pid_started_at.isoformat() if self.pid_started_at else None,
            "boot_pending": self.boot_pending,
            "state_seq": self.state_seq,
            "next_seq": self.next_seq,
            "destroyed_at": self.destroyed_at.isoformat() if self.destroyed_at else None,
            "schedule_fired_at": (
                self.schedule_fired_at.isoformat() if self.schedule_fired_at else None
            ),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], events: list[EventRecord]) -> MachineRecord:
        return cls(
            id=data["id"],
            app=data["app"],
            name=data["name"],
            region=data["region"],
            state=data["state"],
            instance_id=data["instance_id"],
            private_ip=data["private_ip"],
            created_at=parse_time(data["created_at"]),
            updated_at=parse_time(data["updated_at"]),
            config=MachineConfig.model_validate(data["config"]),
            image_ref=ImageRef.model_validate(data["image_ref"]),
            cordoned=data["cordoned"],
            lease=LeaseRecord.from_json(data["lease"]) if data["lease"] else None,
            versions=[VersionRecord(**v) for v in data["versions"]],
            restart_count=data["restart_count"],
            pid=data["pid"],
            pid_started_at=(
                parse_time(data["pid_started_at"]) if data.get("pid_started_at") else None
            ),
            boot_pending=data["boot_pending"],
            state_seq=data["state_seq"],
            next_seq=data["next_seq"],
            destroyed_at=parse_time(data["destroyed_at"]) if data["destroyed_at"] else None,
            schedule_fired_at=(
                parse_time(data["schedule_fired_at"]) if data["schedule_fired_at"] else None
            ),
            events=events,
        )
