"""Typed models of the Fly Machines API's JSON, shared by the client and the local backend.

Every model keeps fields it does not know (``extra="allow"``) and sends them back unchanged, so a
get-modify-update never drops configuration that the API added after this code was written.
``to_api()`` is the one way to turn a model into request JSON: it leaves out fields that are
``None`` (the API treats a missing key and ``null`` alike, and fly-go omits empty fields).

Shapes follow ../shared/fly-machines-api.md sections 3, 6, 8 and 10.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "App",
    "CreateAppRequest",
    "CreateMachineRequest",
    "CreateVolumeRequest",
    "ErrorBody",
    "ExitEvent",
    "ExtendVolumeRequest",
    "ExtendVolumeResponse",
    "File",
    "Guest",
    "ImageRef",
    "Init",
    "Lease",
    "LeaseData",
    "LogEntry",
    "LogsPage",
    "Machine",
    "MachineConfig",
    "MachineEvent",
    "MachineMount",
    "MachineRequest",
    "MonitorEvent",
    "Restart",
    "SignalRequest",
    "StopConfig",
    "StopRequest",
    "UpdateMachineRequest",
    "UpdateVolumeRequest",
    "Volume",
    "VolumeSnapshot",
    "WaitState",
]

WaitState = Literal["started", "stopped", "suspended", "destroyed", "settled"]

# Machine states documented in fly-machines-api.md section 4.
MACHINE_STATES = (
    "created",
    "starting",
    "started",
    "stopping",
    "stopped",
    "suspending",
    "suspended",
    "replacing",
    "replaced",
    "destroying",
    "destroyed",
    "failed",
)


class FlyModel(BaseModel):
    """Base for API models: keeps unknown fields, serialises without ``None`` values."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_api(self) -> dict[str, Any]:
        """Return the JSON-ready dict to send to the API (unknown fields included)."""
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)


class Guest(FlyModel):
    cpu_kind: str | None = None
    cpus: int | None = None
    memory_mb: int | None = None
    gpu_kind: str | None = None
    gpus: int | None = None
    kernel_args: list[str] | None = None
    host_dedication_id: str | None = None
    max_memory_mb: int | None = None


class Init(FlyModel):
    exec: list[str] | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    tty: bool | None = None
    swap_size_mb: int | None = None
    kernel_args: list[str] | None = None


class File(FlyModel):
    """A file placed in the machine at ``guest_path``: base64 ``raw_value`` or a ``secret_name``."""

    guest_path: str
    raw_value: str | None = None
    secret_name: str | None = None
    mode: int | None = None


class Restart(FlyModel):
    policy: str | None = None
    max_retries: int | None = None


class StopConfig(FlyModel):
    signal: str | None = None
    # fly-go sends a Go duration string ("10s"); DOC describes an int. Both are accepted.
    timeout: str | int | None = None


class MachineConfig(FlyModel):
    image: str | None = None
    env: dict[str, str] | None = None
    init: Init | None = None
    guest: Guest | None = None
    size: str | None = None
    files: list[File] | None = None
    restart: Restart | None = None
    schedule: str | None = None
    auto_destroy: bool | None = None
    metadata: dict[str, str] | None = None
    stop_config: StopConfig | None = None
    services: list[dict[str, Any]] | None = None
    checks: dict[str, Any] | None = None
    mounts: list[dict[str, Any]] | None = None
    processes: list[dict[str, Any]] | None = None
    dns: dict[str, Any] | None = None
    statics: list[dict[str, Any]] | None = None
    standbys: list[str] | None = None
    metrics: dict[str, Any] | None = None
    containers: list[dict[str, Any]] | None = None


class ImageRef(FlyModel):
    registry: str | None = None
    repository: str | None = None
    tag: str | None = None
    digest: str | None = None
    labels: dict[str, str] | None = None


class ExitEvent(FlyModel):
    exit_code: int | None = None
    guest_exit_code: int | None = None
    guest_signal: int | None = None
    oom_killed: bool | None = None
    requested_stop: bool | None = None
    restarting: bool | None = None
    signal: int | None = None
    exited_at: str | None = None
    # The local backend says why an exit happened when it was not the program's own doing
    # (e.g. a file that could not be placed); Fly never sends it, so it is optional.
    error: str | None = None


class MonitorEvent(FlyModel):
    exit_event: ExitEvent | None = None


# The field below is named like the class (it is the API's JSON key), which would shadow the
# class while pydantic evaluates the annotation; this alias keeps the type reachable.
_MonitorEvent = MonitorEvent


class MachineRequest(FlyModel):
    exit_event: ExitEvent | None = None
    MonitorEvent: _MonitorEvent | None = None
    restart_count: int | None = None


class MachineEvent(FlyModel):
    id: str | None = None
    type: str
    status: str | None = None
    source: str | None = None
    timestamp: int  # milliseconds since the Unix epoch
    request: MachineRequest | None = None

    def exit_event(self) -> ExitEvent | None:
        """The exit details, preferring ``request.MonitorEvent.exit_event`` as fly-go does."""
        if self.request is None:
            return None
        monitor = self.request.MonitorEvent
        if monitor is not None and monitor.exit_event is not None:
            return monitor.exit_event
        return self.request.exit_event


class Machine(FlyModel):
    id: str
    name: str | None = None
    state: str
    region: str | None = None
    instance_id: str | None = None
    version: str | None = None
    private_ip: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    image_ref: ImageRef | None = None
    config: MachineConfig | None = None
    incomplete_config: MachineConfig | None = None
    events: list[MachineEvent] = Field(default_factory=list)
    checks: list[dict[str, Any]] | None = None
    nonce: str | None = None
    host_status: str | None = None
    cordoned: bool | None = None

    def metadata_value(self, key: str) -> str | None:
        """A ``config.metadata`` entry (``incomplete_config`` when the host sent no config)."""
        config = self.config or self.incomplete_config
        metadata = (config.metadata if config is not None else None) or {}
        return metadata.get(key)

    def last_exit(self) -> MachineEvent | None:
        """The newest ``exit`` event that is newer than the newest ``start`` event.

        Events arrive newest first, but they are sorted here by timestamp so that the answer does
        not depend on the order the server happened to use.
        """
        ordered = sorted(self.events, key=lambda e: e.timestamp, reverse=True)
        for event in ordered:
            if event.type == "exit":
                return event
            if event.type == "start":
                return None
        return None

    def last_start(self) -> MachineEvent | None:
        """The newest ``start`` event: when the machine's current (or last) run began."""
        starts = [e for e in self.events if e.type == "start"]
        return max(starts, key=lambda e: e.timestamp) if starts else None

    def exit_event(self) -> ExitEvent | None:
        event = self.last_exit()
        return event.exit_event() if event is not None else None

    @property
    def exit_code(self) -> int | None:
        """The exit code of the latest run, or None when the machine has not exited since starting.

        fly-go omits ``exit_code`` when it is 0, so an exit event without the key means 0.
        """
        event = self.last_exit()
        if event is None:
            return None
        details = event.exit_event()
        if details is None or details.exit_code is None:
            return 0
        return details.exit_code


class LeaseData(FlyModel):
    nonce: str | None = None
    expires_at: int | None = None  # Unix seconds
    owner: str | None = None
    description: str | None = None
    version: str | None = None


class Lease(FlyModel):
    """The lease envelope: ``{"status": "success", "data": {...}}``."""

    status: str | None = None
    data: LeaseData | None = None
    message: str | None = None
    code: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "success"


class CreateMachineRequest(FlyModel):
    config: MachineConfig
    name: str | None = None
    region: str | None = None
    skip_launch: bool | None = None
    skip_service_registration: bool | None = None
    lease_ttl: int | None = None
    lsvd: bool | None = None
    skip_secrets: bool | None = None
    min_secrets_version: int | None = None


class UpdateMachineRequest(CreateMachineRequest):
    current_version: str | None = None


class StopRequest(FlyModel):
    signal: str | None = None
    timeout: str | int | None = None


class SignalRequest(FlyModel):
    signal: str | int


class App(FlyModel):
    id: str | None = None
    name: str
    status: str | None = None
    machine_count: int | None = None
    network: str | None = None
    organization: dict[str, Any] | None = None


class CreateAppRequest(FlyModel):
    app_name: str
    org_slug: str | None = None
    network: str | None = None


class ErrorBody(FlyModel):
    error: str | None = None
    status: str | None = None
    message: str | None = None
    details: str | None = None


class LogEntry(FlyModel):
    """One line from the logs API (the ``attributes`` of a JSON:API record, plus its ``id``)."""

    id: str | None = None
    timestamp: str
    message: str
    level: str | None = None
    instance: str | None = None
    region: str | None = None
    meta: dict[str, Any] | None = None


class LogsPage(FlyModel):
    entries: list[LogEntry] = Field(default_factory=list)
    next_token: str | None = None


# Volumes (the 2024 swagger's Volume, CreateVolumeRequest, ... and fly.MachineMount).
class MachineMount(FlyModel):
    """One entry of ``config.mounts``: the volume (``vol_...``) and where the machine sees it."""

    volume: str | None = None
    path: str | None = None
    name: str | None = None
    size_gb: int | None = None
    encrypted: bool | None = None
    add_size_gb: int | None = None
    size_gb_limit: int | None = None
    extend_threshold_percent: int | None = None


class Volume(FlyModel):
    id: str
    name: str | None = None
    state: str | None = None
    size_gb: int | None = None
    region: str | None = None
    zone: str | None = None
    encrypted: bool | None = None
    fstype: str | None = None
    created_at: str | None = None
    attached_machine_id: str | None = None
    attached_alloc_id: str | None = None
    auto_backup_enabled: bool | None = None
    snapshot_retention: int | None = None
    block_size: int | None = None
    blocks: int | None = None
    blocks_avail: int | None = None
    blocks_free: int | None = None


class CreateVolumeRequest(FlyModel):
    name: str | None = None
    region: str | None = None
    size_gb: int | None = None
    encrypted: bool | None = None
    fstype: str | None = None
    require_unique_zone: bool | None = None
    machines_only: bool | None = None
    snapshot_id: str | None = None
    snapshot_retention: int | None = None
    source_volume_id: str | None = None
    compute: Guest | None = None


class UpdateVolumeRequest(FlyModel):
    auto_backup_enabled: bool | None = None
    snapshot_retention: int | None = None


class ExtendVolumeRequest(FlyModel):
    size_gb: int | None = None


class ExtendVolumeResponse(FlyModel):
    needs_restart: bool | None = None
    volume: Volume | None = None


class VolumeSnapshot(FlyModel):
    id: str
    created_at: str | None = None
    digest: str | None = None
    size: int | None = None
    status: str | None = None
