"""``MachinesClient``: the synchronous face of ``AsyncMachinesClient``.

It owns an ``AsyncMachinesClient`` running on a private event loop thread
(``jobrunner._sync.Portal``), and every method is a one-line forward to the async method of the
same name and parameters, so no behaviour is written twice. A test checks that the two classes
keep the same methods and signatures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from jobrunner._sync import Portal
from jobrunner.machines.client import AsyncMachinesClient
from jobrunner.machines.clock import Clock
from jobrunner.machines.config import ClientConfig
from jobrunner.machines.introspection import ExecResult, MachineVersion, ProcessStat
from jobrunner.machines.models import (
    App,
    Lease,
    LogEntry,
    LogsPage,
    Machine,
    MachineConfig,
    MachineEvent,
    Volume,
    WaitState,
)
from jobrunner.machines.ratelimit import Limiter
from jobrunner.machines.retry import RequestRetryPolicy
from jobrunner.machines.wait import DEFAULT_NOT_FOUND_GRACE

__all__ = ["MachinesClient"]

F = TypeVar("F", bound=Callable[..., Any])
_A = AsyncMachinesClient


def _doc(source: Callable[..., Any]) -> Callable[[F], F]:
    """Give the sync method the async method's docstring (one text to keep true, not two)."""

    def apply(fn: F) -> F:
        fn.__doc__ = source.__doc__
        return fn

    return apply


async def _open(*args: Any, **kwargs: Any) -> AsyncMachinesClient:
    # Built on the portal's loop so everything async inside it belongs to that loop.
    return AsyncMachinesClient(*args, **kwargs)


class MachinesClient:
    """A blocking Machines API client with the same constructor and methods as the async one.

    Use it as ``with MachinesClient.from_env() as client: ...`` or call ``close()``.
    """

    def __init__(
        self,
        app: str | None = None,
        *,
        token: str | None = None,
        base_url: str | None = None,
        logs_base_url: str | None = None,
        config: ClientConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RequestRetryPolicy | None = None,
        rate_limit: bool = True,
        timeout: float = 30.0,
        user_agent: str | None = None,
        clock: Clock | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self._portal = Portal()
        try:
            self._client = self._portal.call(
                _open,
                app,
                token=token,
                base_url=base_url,
                logs_base_url=logs_base_url,
                config=config,
                transport=transport,
                retry=retry,
                rate_limit=rate_limit,
                timeout=timeout,
                user_agent=user_agent,
                clock=clock,
                limiter=limiter,
            )
        except BaseException:
            self._portal.close()
            raise
        self._closed = False

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """A client configured from the environment (see ``ClientConfig.from_env``).

        Keyword arguments are passed to the constructor and win over the environment.
        """
        config = overrides.pop("config", None) or ClientConfig.from_env()
        return cls(config=config, **overrides)

    @property
    def config(self) -> ClientConfig:
        """The addresses, token holder and default app in use."""
        return self._client.config

    def __repr__(self) -> str:
        return repr(self._client).replace(type(self._client).__name__, type(self).__name__, 1)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool and stop the event loop thread (safe to call twice)."""
        if not self._closed:
            self._closed = True
            try:
                self._portal.call(self._client.aclose)
            finally:
                self._portal.close()

    # -- apps ---------------------------------------------------------------------------------

    @_doc(_A.list_apps)
    def list_apps(self, org_slug: str | None = None) -> list[App]:
        return self._portal.call(self._client.list_apps, org_slug)

    @_doc(_A.create_app)
    def create_app(
        self, name: str, *, org_slug: str | None = None, network: str | None = None
    ) -> None:
        return self._portal.call(self._client.create_app, name, org_slug=org_slug, network=network)

    @_doc(_A.get_app)
    def get_app(self, name: str) -> App:
        return self._portal.call(self._client.get_app, name)

    @_doc(_A.delete_app)
    def delete_app(self, name: str) -> None:
        return self._portal.call(self._client.delete_app, name)

    # -- machines -----------------------------------------------------------------------------

    @_doc(_A.list_machines)
    def list_machines(
        self,
        *,
        include_deleted: bool = False,
        region: str | None = None,
        metadata: Mapping[str, str] | None = None,
        app: str | None = None,
    ) -> list[Machine]:
        return self._portal.call(
            self._client.list_machines,
            include_deleted=include_deleted,
            region=region,
            metadata=metadata,
            app=app,
        )

    @_doc(_A.create_machine)
    def create_machine(
        self,
        config: MachineConfig | Mapping[str, Any],
        *,
        name: str | None = None,
        region: str | None = None,
        skip_launch: bool | None = None,
        skip_service_registration: bool | None = None,
        lease_ttl: int | None = None,
        app: str | None = None,
    ) -> Machine:
        return self._portal.call(
            self._client.create_machine,
            config,
            name=name,
            region=region,
            skip_launch=skip_launch,
            skip_service_registration=skip_service_registration,
            lease_ttl=lease_ttl,
            app=app,
        )

    @_doc(_A.get_machine)
    def get_machine(self, machine_id: str, *, app: str | None = None) -> Machine:
        return self._portal.call(self._client.get_machine, machine_id, app=app)

    @_doc(_A.update_machine)
    def update_machine(
        self,
        machine_id: str,
        config: MachineConfig | Mapping[str, Any],
        *,
        current_version: str | None = None,
        skip_launch: bool | None = None,
        nonce: str | None = None,
        app: str | None = None,
    ) -> Machine:
        return self._portal.call(
            self._client.update_machine,
            machine_id,
            config,
            current_version=current_version,
            skip_launch=skip_launch,
            nonce=nonce,
            app=app,
        )

    @_doc(_A.stop_machine)
    def stop_machine(
        self,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout: float | str | None = None,
        nonce: str | None = None,
        app: str | None = None,
    ) -> None:
        return self._portal.call(
            self._client.stop_machine,
            machine_id,
            signal=signal,
            timeout=timeout,
            nonce=nonce,
            app=app,
        )

    @_doc(_A.suspend_machine)
    def suspend_machine(
        self, machine_id: str, *, nonce: str | None = None, app: str | None = None
    ) -> None:
        return self._portal.call(self._client.suspend_machine, machine_id, nonce=nonce, app=app)

    @_doc(_A.start_machine)
    def start_machine(
        self, machine_id: str, *, nonce: str | None = None, app: str | None = None
    ) -> dict[str, Any]:
        return self._portal.call(self._client.start_machine, machine_id, nonce=nonce, app=app)

    @_doc(_A.restart_machine)
    def restart_machine(
        self,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout: float | str | None = None,
        force_stop: bool | None = None,
        nonce: str | None = None,
        app: str | None = None,
    ) -> None:
        return self._portal.call(
            self._client.restart_machine,
            machine_id,
            signal=signal,
            timeout=timeout,
            force_stop=force_stop,
            nonce=nonce,
            app=app,
        )

    @_doc(_A.signal_machine)
    def signal_machine(
        self,
        machine_id: str,
        signal: str | int,
        *,
        nonce: str | None = None,
        app: str | None = None,
    ) -> None:
        return self._portal.call(
            self._client.signal_machine, machine_id, signal, nonce=nonce, app=app
        )

    @_doc(_A.delete_machine)
    def delete_machine(
        self,
        machine_id: str,
        *,
        force: bool = False,
        nonce: str | None = None,
        app: str | None = None,
    ) -> None:
        return self._portal.call(
            self._client.delete_machine, machine_id, force=force, nonce=nonce, app=app
        )

    @_doc(_A.list_events)
    def list_events(self, machine_id: str, *, app: str | None = None) -> list[MachineEvent]:
        return self._portal.call(self._client.list_events, machine_id, app=app)

    @_doc(_A.cordon)
    def cordon(self, machine_id: str, *, nonce: str | None = None, app: str | None = None) -> None:
        return self._portal.call(self._client.cordon, machine_id, nonce=nonce, app=app)

    @_doc(_A.uncordon)
    def uncordon(
        self, machine_id: str, *, nonce: str | None = None, app: str | None = None
    ) -> None:
        return self._portal.call(self._client.uncordon, machine_id, nonce=nonce, app=app)

    # -- versions, processes, exec --------------------------------------------------------------

    @_doc(_A.list_versions)
    def list_versions(self, machine_id: str, *, app: str | None = None) -> list[MachineVersion]:
        return self._portal.call(self._client.list_versions, machine_id, app=app)

    @_doc(_A.list_processes)
    def list_processes(
        self,
        machine_id: str,
        *,
        sort_by: str | None = None,
        order: str | None = None,
        app: str | None = None,
    ) -> list[ProcessStat]:
        return self._portal.call(
            self._client.list_processes, machine_id, sort_by=sort_by, order=order, app=app
        )

    @_doc(_A.exec_machine)
    def exec_machine(
        self,
        machine_id: str,
        command: Sequence[str],
        *,
        timeout: int | None = None,
        app: str | None = None,
    ) -> ExecResult:
        return self._portal.call(
            self._client.exec_machine, machine_id, command, timeout=timeout, app=app
        )

    # -- leases -------------------------------------------------------------------------------

    @_doc(_A.acquire_lease)
    def acquire_lease(
        self,
        machine_id: str,
        *,
        ttl: int,
        description: str | None = None,
        nonce: str | None = None,
        app: str | None = None,
    ) -> Lease:
        return self._portal.call(
            self._client.acquire_lease,
            machine_id,
            ttl=ttl,
            description=description,
            nonce=nonce,
            app=app,
        )

    @_doc(_A.get_lease)
    def get_lease(self, machine_id: str, *, app: str | None = None) -> Lease:
        return self._portal.call(self._client.get_lease, machine_id, app=app)

    @_doc(_A.release_lease)
    def release_lease(self, machine_id: str, nonce: str, *, app: str | None = None) -> None:
        return self._portal.call(self._client.release_lease, machine_id, nonce, app=app)

    # -- metadata -----------------------------------------------------------------------------

    @_doc(_A.get_metadata)
    def get_metadata(self, machine_id: str, *, app: str | None = None) -> dict[str, str]:
        return self._portal.call(self._client.get_metadata, machine_id, app=app)

    @_doc(_A.set_metadata)
    def set_metadata(
        self,
        machine_id: str,
        key: str,
        value: str,
        *,
        nonce: str | None = None,
        app: str | None = None,
    ) -> None:
        return self._portal.call(
            self._client.set_metadata, machine_id, key, value, nonce=nonce, app=app
        )

    @_doc(_A.delete_metadata)
    def delete_metadata(
        self, machine_id: str, key: str, *, nonce: str | None = None, app: str | None = None
    ) -> None:
        return self._portal.call(
            self._client.delete_metadata, machine_id, key, nonce=nonce, app=app
        )

    # -- wait and logs ------------------------------------------------------------------------

    @_doc(_A.wait)
    def wait(
        self,
        machine: str | Machine,
        state: WaitState | Sequence[WaitState] = "started",
        *,
        instance_id: str | None = None,
        version: str | None = None,
        from_event_id: str | None = None,
        timeout: float = 60.0,
        not_found_grace: float = DEFAULT_NOT_FOUND_GRACE,
        app: str | None = None,
    ) -> None:
        return self._portal.call(
            self._client.wait,
            machine,
            state,
            instance_id=instance_id,
            version=version,
            from_event_id=from_event_id,
            timeout=timeout,
            not_found_grace=not_found_grace,
            app=app,
        )

    @_doc(_A.get_logs)
    def get_logs(
        self,
        *,
        instance: str | None = None,
        region: str | None = None,
        next_token: str | None = None,
        app: str | None = None,
    ) -> LogsPage:
        return self._portal.call(
            self._client.get_logs, instance=instance, region=region, next_token=next_token, app=app
        )

    @_doc(_A.follow_logs)
    def follow_logs(
        self,
        *,
        instance: str | None = None,
        region: str | None = None,
        next_token: str | None = None,
        poll_interval: float = 0.5,
        until: Callable[[], bool] | None = None,
        app: str | None = None,
    ) -> Iterator[LogEntry]:
        return self._portal.iterate(
            lambda: self._client.follow_logs(
                instance=instance,
                region=region,
                next_token=next_token,
                poll_interval=poll_interval,
                until=until,
                app=app,
            )
        )

    # ---- volumes ----

    @_doc(_A.list_volumes)
    def list_volumes(self, *, app: str | None = None) -> list[Volume]:
        return self._portal.call(lambda: self._client.list_volumes(app=app))

    @_doc(_A.get_volume)
    def get_volume(self, volume_id: str, *, app: str | None = None) -> Volume:
        return self._portal.call(lambda: self._client.get_volume(volume_id, app=app))

    @_doc(_A.create_volume)
    def create_volume(
        self,
        name: str,
        *,
        size_gb: int | None = None,
        region: str | None = None,
        app: str | None = None,
    ) -> Volume:
        return self._portal.call(
            lambda: self._client.create_volume(name, size_gb=size_gb, region=region, app=app)
        )

    @_doc(_A.delete_volume)
    def delete_volume(self, volume_id: str, *, app: str | None = None) -> None:
        return self._portal.call(lambda: self._client.delete_volume(volume_id, app=app))

    @_doc(_A.resolve_mounts)
    def resolve_mounts(
        self, config: MachineConfig, *, app: str, region: str | None = None
    ) -> MachineConfig:
        return self._portal.call(
            lambda: self._client.resolve_mounts(config, app=app, region=region)
        )
