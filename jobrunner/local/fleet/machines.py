"""The Machines API operations (fly-machines-api.md sections 3 and 4), apart from HTTP details.

Each method checks the request against the machine's state and lease, then asks the lifecycle to
act. Actions on one machine are serialised by its lock, so a stop racing an update cannot
interleave; reads need no lock because the server runs on one event loop.

Status codes chosen where Fly's are undocumented (see docs/local-backend.md):
412 for an action the machine's state does not allow and for a stale ``current_version``,
409 for lease conflicts, 404 for any action on a destroyed machine except reading it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from typing import Any

from jobrunner.local.api.errors import ApiError, bad_request, precondition_failed, unprocessable
from jobrunner.local.api.validate import parse_duration, parse_signal, validate_config
from jobrunner.local.fleet import ids as ids
from jobrunner.local.fleet import leases
from jobrunner.local.fleet.lifecycle import Lifecycle
from jobrunner.local.fleet.records import (
    AppRecord,
    MachineRecord,
    VersionRecord,
    image_ref_for,
)
from jobrunner.local.fleet.registry import Registry
from jobrunner.local.fleet.volumes import VolumeService
from jobrunner.machines.models import CreateAppRequest, CreateMachineRequest, UpdateMachineRequest

__all__ = ["DEFAULT_REGION", "MachineService"]

logger = logging.getLogger("jobrunner.local")

DEFAULT_REGION = "local"
_APP_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_STARTABLE = ("created", "stopped", "failed")


class MachineService:
    """Apps and machines as the HTTP layer sees them: plain arguments in, API JSON out."""

    def __init__(self, registry: Registry, lifecycle: Lifecycle) -> None:
        self._registry = registry
        self._lifecycle = lifecycle
        self._said_image_not_pulled = False
        # The database lives in the state dir, beside the volumes' directories.
        self.volumes = VolumeService(registry, registry.store.path.parent)

    # apps
    def ensure_app(self, name: str) -> None:
        if name not in self._registry.apps:
            self._save_app(AppRecord(name, "personal", "default", self._registry.now()))

    def list_apps(self, org_slug: str | None) -> dict[str, Any]:
        apps = [
            {
                "id": app.name,
                "name": app.name,
                "machine_count": self._machine_count(app.name),
                "network": app.network,
            }
            for app in self._registry.apps.values()
            if not org_slug or org_slug == app.org_slug
        ]
        return {"total_apps": len(apps), "apps": apps}

    def create_app(self, request: CreateAppRequest) -> dict[str, Any]:
        name = request.app_name
        if not _APP_NAME.match(name):
            raise unprocessable(
                f"app_name {name!r} is invalid: use lowercase letters, digits and dashes "
                "(at most 63 characters, starting with a letter or digit)"
            )
        if name in self._registry.apps:
            raise unprocessable(f"Validation failed: app name {name!r} has already been taken")
        app = AppRecord(name, request.org_slug or "personal", request.network or "default",
                        self._registry.now())  # fmt: skip
        self._save_app(app)
        return self.get_app(name)

    def get_app(self, name: str) -> dict[str, Any]:
        app = self._registry.app(name)
        return {
            "id": app.name,
            "name": app.name,
            "organization": {"name": app.org_slug, "slug": app.org_slug},
            "status": "deployed",
        }

    async def delete_app(self, name: str) -> None:
        """Destroy the app's machines (killing running ones), then forget the app."""
        self._registry.app(name)
        machines = [m for m in self._registry.machines.values() if m.app == name]
        for machine in machines:
            if machine.state != "destroyed":
                await self._destroy(machine, force=True)
        for machine in machines:
            self._registry.forget(machine.id)
        await self.volumes.delete_app_volumes(name)
        del self._registry.apps[name]
        self._registry.store.delete_app(name)

    def _save_app(self, app: AppRecord) -> None:
        self._registry.apps[app.name] = app
        self._registry.store.save_app(app)

    def _machine_count(self, app: str) -> int:
        return sum(
            1 for m in self._registry.machines.values() if m.app == app and m.state != "destroyed"
        )

    # machines: reading
    def list_machines(
        self, app: str, *, include_deleted: bool, region: str | None, metadata: dict[str, str]
    ) -> list[dict[str, Any]]:
        self._registry.app(app)
        found = []
        for machine in sorted(self._registry.machines.values(), key=lambda m: m.created_at):
            if machine.app != app or (machine.state == "destroyed" and not include_deleted):
                continue
            if region and machine.region != region:
                continue
            tags = machine.config.metadata or {}
            if any(tags.get(key) != value for key, value in metadata.items()):
                continue
            found.append(machine.to_api())
        return found

    def get_machine(self, app: str, machine_id: str) -> dict[str, Any]:
        return self._registry.machine(app, machine_id).to_api()

    def events(self, app: str, machine_id: str) -> list[dict[str, Any]]:
        return [record.to_api() for record in self._registry.machine(app, machine_id).events]

    def versions(self, app: str, machine_id: str) -> list[dict[str, Any]]:
        machine = self._registry.machine(app, machine_id)
        return [version.to_api() for version in reversed(machine.versions)]

    # machines: create and update
    def create_machine(self, app: str, request: CreateMachineRequest) -> dict[str, Any]:
        self._registry.app(app)
        config = validate_config(request.config)
        name = request.name or self._unused_name(app)
        if self._name_taken(app, name):
            raise ApiError(
                422, "Validation failed: Name has already been taken", fly_status="name_taken"
            )
        if request.lease_ttl is not None and request.lease_ttl < 0:
            raise bad_request("lease_ttl must be a number of seconds, 0 or more")
        config, region = self.volumes.check_mounts(app, config, request.region, None)
        now = self._registry.now()
        machine_id = ids.machine_id()
        instance_id = ids.ulid()
        machine = MachineRecord(
            id=machine_id,
            app=app,
            name=name,
            region=region or DEFAULT_REGION,
            state="created",
            instance_id=instance_id,
            private_ip=ids.private_ip(app, machine_id),
            created_at=now,
            updated_at=now,
            config=config,
            image_ref=image_ref_for(config.image or ""),
            versions=[VersionRecord(instance_id, config.to_api())],
            boot_pending=not request.skip_launch,
        )
        self._registry.machines[machine_id] = machine
        self.volumes.attach(machine)
        nonce = None
        if request.lease_ttl:
            nonce = leases.acquire(machine, now, request.lease_ttl, "", None).nonce
        self._registry.set_state(machine, "created")
        self._registry.add_event(machine, "launch", "created", "user")
        self._say_image_not_pulled(config.image or "")
        if not request.skip_launch:
            # Boot on the next loop turn: the answer shows "created", as Fly's does.
            asyncio.get_running_loop().call_soon(self._boot_if_still_created, machine)
        return machine.to_api(include_nonce=nonce)

    def _boot_if_still_created(self, machine: MachineRecord) -> None:
        if machine.state == "created" and machine.boot_pending:
            self._lifecycle.boot(machine)

    async def update_machine(
        self, app: str, machine_id: str, request: UpdateMachineRequest, nonce: str | None
    ) -> dict[str, Any]:
        machine = self._acting_on(app, machine_id, nonce)
        config = validate_config(request.config)
        if request.current_version and request.current_version != machine.instance_id:
            raise precondition_failed(
                f"current_version {request.current_version} is stale: machine {machine_id} is at "
                f"{machine.instance_id}; GET it and apply your change again"
            )
        for field, value in (("name", request.name), ("region", request.region)):
            if value and value != getattr(machine, field):
                raise unprocessable(f"{field} cannot be changed by an update (it is {value!r})")
        runtime = self._registry.runtime(machine)
        async with runtime.lock:
            self._require_live(machine)
            # Checked under the lock: no other update or create can take the volume meanwhile.
            config, _ = self.volumes.check_mounts(app, config, machine.region, machine.id)
            was = machine.state
            if runtime.task is not None:
                self._registry.set_state(machine, "replacing")
                self._lifecycle.request_stop(machine, "replace")
                await self._lifecycle.wait_run_over(machine)
            for version in machine.versions:
                version.replaced = True
            machine.instance_id = ids.ulid()
            machine.config = config
            machine.image_ref = image_ref_for(config.image or "")
            machine.versions.append(VersionRecord(machine.instance_id, config.to_api()))
            self.volumes.attach(machine)
            machine.restart_count = 0
            machine.boot_pending = False
            if request.skip_launch:
                self._registry.set_state(machine, "created" if was == "created" else "stopped")
            else:
                self._lifecycle.boot(machine)
            self._registry.add_event(machine, "update", "replaced", "user")
        return machine.to_api()

    # machines: actions
    async def start(self, app: str, machine_id: str, nonce: str | None) -> dict[str, Any]:
        machine = self._acting_on(app, machine_id, nonce)
        runtime = self._registry.runtime(machine)
        async with runtime.lock:
            self._require_live(machine)
            previous = machine.state
            if previous == "suspended":
                self._lifecycle.resume(machine)
            elif previous in _STARTABLE:
                self.boot_by(machine, "user")
            elif previous not in ("started", "starting"):
                raise precondition_failed(
                    f"machine {machine_id} is {previous}: it can be started when created, "
                    "stopped, suspended or failed; wait for one of those states"
                )
        return {"previous_state": previous, "migrated": False, "new_host": ""}

    def boot_by(self, machine: MachineRecord, source: str) -> None:
        """A fresh start asked for by the user or the scheduler: retry counting starts over."""
        machine.restart_count = 0
        self._lifecycle.boot(machine)
        self._registry.add_event(machine, "start", "starting", source)

    async def stop(
        self, app: str, machine_id: str, sig: object, timeout: object, nonce: str | None
    ) -> None:
        machine = self._acting_on(app, machine_id, nonce)
        signal_number = parse_signal(sig) if sig is not None else None
        grace = parse_duration(timeout) if timeout is not None else None
        runtime = self._registry.runtime(machine)
        async with runtime.lock:
            self._require_live(machine)
            if runtime.task is not None and machine.state in ("starting", "started", "suspended"):
                self._registry.set_state(machine, "stopping")
                self._registry.add_event(machine, "stop", "stopping", "user")
                self._lifecycle.request_stop(machine, "stop", signal_number, grace)
            elif machine.state not in ("stopping", *_STARTABLE):
                raise precondition_failed(
                    f"machine {machine_id} is {machine.state}: wait until it is started, then "
                    "stop it"
                )

    async def suspend(self, app: str, machine_id: str, nonce: str | None) -> None:
        machine = self._acting_on(app, machine_id, nonce)
        runtime = self._registry.runtime(machine)
        async with runtime.lock:
            self._require_live(machine)
            if machine.state == "suspended":
                return
            if machine.state != "started" or runtime.handle is None:
                raise precondition_failed(
                    f"machine {machine_id} is {machine.state}: only a started machine can be "
                    "suspended"
                )
            if machine.config.schedule:
                raise precondition_failed(
                    f"machine {machine_id} has a schedule; scheduled machines cannot be suspended"
                )
            self._lifecycle.suspend(machine)

    async def restart(
        self,
        app: str,
        machine_id: str,
        *,
        sig: str | None,
        timeout: str | None,
        force_stop: bool,
        nonce: str | None,
    ) -> None:
        machine = self._acting_on(app, machine_id, nonce)
        signal_number = parse_signal(sig) if sig else None
        if force_stop:
            signal_number = int(signal.SIGKILL)
        grace = parse_duration(timeout) if timeout else None
        runtime = self._registry.runtime(machine)
        async with runtime.lock:
            self._require_live(machine)
            if runtime.task is not None and machine.state in ("started", "suspended"):
                self._registry.set_state(machine, "restarting")
                self._registry.add_event(machine, "restart", "restarting", "user")
                self._lifecycle.request_stop(machine, "restart", signal_number, grace)
            elif machine.state in _STARTABLE:
                self.boot_by(machine, "user")
            else:
                raise precondition_failed(
                    f"machine {machine_id} is {machine.state}: wait until it is started or "
                    "stopped, then restart it"
                )

    def signal(self, app: str, machine_id: str, sig: object) -> None:
        machine = self._registry.live_machine(app, machine_id)
        signal_number = parse_signal(sig)
        if machine.state not in ("started", "suspended", "stopping"):
            raise precondition_failed(
                f"machine {machine_id} is {machine.state}: only a running machine takes signals"
            )
        self._lifecycle.send_signal(machine, signal_number)

    async def destroy(self, app: str, machine_id: str, *, force: bool, nonce: str | None) -> None:
        machine = self._acting_on(app, machine_id, nonce)
        await self._destroy(machine, force=force)

    async def _destroy(self, machine: MachineRecord, *, force: bool) -> None:
        runtime = self._registry.runtime(machine)
        async with runtime.lock:
            self._require_live(machine)
            if runtime.task is not None:
                if not force and machine.state != "suspended":
                    raise precondition_failed(
                        f"machine {machine.id} is {machine.state}: stop it first, or destroy it "
                        "with force=true (kill=true) to kill it"
                    )
                self._lifecycle.request_stop(machine, "destroy", int(signal.SIGKILL), 0.0)
                await self._lifecycle.wait_run_over(machine)
            if machine.state != "destroyed":
                self._lifecycle.destroy_now(machine, source="user")

    # leases
    def acquire_lease(
        self,
        app: str,
        machine_id: str,
        *,
        ttl: int | None,
        description: str,
        nonce: str | None,
    ) -> dict[str, Any]:
        machine = self._registry.live_machine(app, machine_id)
        lease = leases.acquire(
            machine,
            self._registry.now(),
            leases.DEFAULT_TTL if ttl is None else ttl,
            description,
            nonce,
        )
        self._registry.save(machine)
        return lease.to_api()

    def get_lease(self, app: str, machine_id: str) -> dict[str, Any]:
        machine = self._registry.machine(app, machine_id)
        lease = leases.active_lease(machine, self._registry.now())
        if lease is None:
            raise ApiError(404, f"machine {machine_id} has no lease")
        return lease.to_api()

    def release_lease(self, app: str, machine_id: str, nonce: str | None) -> dict[str, Any]:
        machine = self._registry.live_machine(app, machine_id)
        leases.release(machine, self._registry.now(), nonce)
        self._registry.save(machine)
        return {"status": "success", "data": {"ok": True}}

    # cordon and metadata
    def cordon(self, app: str, machine_id: str, nonce: str | None, *, cordoned: bool) -> None:
        machine = self._acting_on(app, machine_id, nonce)
        machine.cordoned = cordoned
        self._registry.save(machine)

    def get_metadata(self, app: str, machine_id: str) -> dict[str, str]:
        return dict(self._registry.machine(app, machine_id).config.metadata or {})

    def set_metadata(self, app: str, machine_id: str, key: str, value: str | None) -> None:
        machine = self._registry.live_machine(app, machine_id)
        tags = dict(machine.config.metadata or {})
        if value is None:
            tags.pop(key, None)
        else:
            tags[key] = value
        # Metadata changes in place: no new version, the machine keeps running.
        machine.config = machine.config.model_copy(update={"metadata": tags})
        machine.versions[-1].user_config = machine.config.to_api()
        self._registry.save(machine)

    # helpers
    def _acting_on(self, app: str, machine_id: str, nonce: str | None) -> MachineRecord:
        machine = self._registry.live_machine(app, machine_id)
        leases.check(machine, self._registry.now(), nonce)
        return machine

    def _require_live(self, machine: MachineRecord) -> None:
        # Re-checked after taking the lock: another request may have destroyed it meanwhile.
        self._registry.live_machine(machine.app, machine.id)

    def _name_taken(self, app: str, name: str) -> bool:
        return any(
            m.app == app and m.name == name and m.state != "destroyed"
            for m in self._registry.machines.values()
        )

    def _unused_name(self, app: str) -> str:
        while True:
            name = ids.machine_name()
            if not self._name_taken(app, name):
                return name

    def _say_image_not_pulled(self, image: str) -> None:
        if not self._said_image_not_pulled:
            self._said_image_not_pulled = True
            logger.info(
                "the local backend records each machine's image (%s) but does not pull or run "
                "it: machines run config.init's command, or the image's command from the local "
                "image catalog, as a local process",
                image,
            )
