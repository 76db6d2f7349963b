"""``AsyncMachinesClient``: a typed asyncio client for the Fly Machines API and the logs API.

Each endpoint method builds its path, query and body, sends through ``ClientBase._request``
(rate limit, one HTTP exchange, error mapping, retry policy; see _base.py) and parses the answer
into the shared models. Behaviour with more to it lives in its own module: the retry rules
(retry.py), the rate limiter (ratelimit.py), the wait loop (wait.py), duplicate-free creates
(create.py) and log following (logs.py). sync.py wraps this class for synchronous callers.

Machine methods take ``app=`` and fall back to the client's app (``FLY_APP``); without either
they raise ``ConfigError``. Calls that change a machine take ``nonce=``, sent as the
``fly-machine-lease-nonce`` header when the machine is leased.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import httpx

from jobrunner.machines._requests import (
    Params,
    app_path,
    apps_path,
    config_from,
    go_duration,
    machines_path,
    parse_apps,
    parse_json,
    parse_lease,
    parse_model,
    parse_models,
    query_bool,
)
from jobrunner.machines.create import (
    SUBMIT_ID_KEY,
    create_without_duplicates,
    submit_id_of,
    tag_config,
)
from jobrunner.machines.errors import LeaseError, NotFound
from jobrunner.machines.introspection import MachineIntrospection
from jobrunner.machines.logs import follow_log_pages, logs_path, parse_logs_page
from jobrunner.machines.models import (
    App,
    CreateAppRequest,
    CreateMachineRequest,
    Lease,
    LogEntry,
    LogsPage,
    Machine,
    MachineConfig,
    MachineEvent,
    UpdateMachineRequest,
    WaitState,
)
from jobrunner.machines.retry import NO_RETRY, RequestRetryPolicy
from jobrunner.machines.volumes import VolumeEndpoints
from jobrunner.machines.wait import (
    DEFAULT_NOT_FOUND_GRACE,
    check_wait_timeout,
    normalize_states,
    wait_for_state,
)

__all__ = ["AsyncMachinesClient"]

# A wait poll holds the connection for up to its own timeout; give the read this much more.
_POLL_READ_MARGIN = 15.0


class AsyncMachinesClient(MachineIntrospection, VolumeEndpoints):
    """Talks to one Machines API (Fly's, or the local backend) on behalf of one token.

    Use it as ``async with AsyncMachinesClient.from_env() as client: ...`` or call ``aclose()``.
    The versions, ps and exec endpoints come from ``MachineIntrospection`` (introspection.py),
    the volumes endpoints from ``VolumeEndpoints`` (volumes.py).
    Cookies the API sets (e.g. its affinity cookie) are kept and sent back on later calls.
    ``clock`` is for tests: it replaces time and sleeping in retries, rate limits and waits.
    """

    # -- apps ---------------------------------------------------------------------------------

    async def list_apps(self, org_slug: str | None = None) -> list[App]:
        """The apps the token can see, optionally only those of one organization."""
        params = [("org_slug", org_slug)] if org_slug else None
        data = await self._json(
            "GET",
            apps_path(),
            what="list apps",
            action="list_apps",
            scope=org_slug or "",
            params=params,
        )
        return parse_apps(data)

    async def create_app(
        self, name: str, *, org_slug: str | None = None, network: str | None = None
    ) -> None:
        """Create an app (201). A taken name raises ``ValidationFailed``."""
        body = CreateAppRequest(app_name=name, org_slug=org_slug, network=network).to_api()
        await self._request(
            "POST", apps_path(), action="create_app", scope=name, idempotent=False, json=body
        )

    async def get_app(self, name: str) -> App:
        """One app by name."""
        data = await self._json("GET", app_path(name), what="get app", action="get_app", scope=name)
        return parse_model(data, App, what="get app")

    async def delete_app(self, name: str) -> None:
        """Delete an app and everything in it (202)."""
        await self._request("DELETE", app_path(name), action="delete_app", scope=name)

    # -- machines -----------------------------------------------------------------------------

    async def list_machines(
        self,
        *,
        include_deleted: bool = False,
        region: str | None = None,
        metadata: Mapping[str, str] | None = None,
        app: str | None = None,
    ) -> list[Machine]:
        """Machines of the app; ``metadata`` keeps those whose config metadata has these pairs."""
        app = self._app(app)
        params: Params = []
        if include_deleted:
            params.append(("include_deleted", query_bool(True)))
        if region is not None:
            params.append(("region", region))
        params.extend((f"metadata.{key}", value) for key, value in (metadata or {}).items())
        data = await self._json(
            "GET",
            machines_path(app),
            what="list machines",
            action="list",
            scope=app,
            params=params,
        )
        return parse_models(data, Machine, what="list machines")

    async def create_machine(
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
        """Create (and, unless ``skip_launch``, start) a machine. Never makes two: see create.py.

        The sent ``config.metadata`` gains a ``jobrunner_submit_id``; the caller's object is not
        changed.
        """
        app = self._app(app)
        tagged, submit_id = tag_config(config)
        tagged = await self.resolve_mounts(tagged, app=app, region=region)  # volume names -> ids
        body = CreateMachineRequest(
            config=tagged,
            name=name,
            region=region,
            skip_launch=skip_launch,
            skip_service_registration=skip_service_registration,
            lease_ttl=lease_ttl,
        ).to_api()

        async def post() -> Machine:
            # Single tries: create_without_duplicates decides about every retry itself.
            data = await self._json(
                "POST",
                machines_path(app),
                what="create machine",
                action="create",
                scope=app,
                idempotent=False,
                json=body,
                retry=NO_RETRY,
            )
            return parse_model(data, Machine, what="create machine")

        return await create_without_duplicates(
            post=post,
            find=lambda: self._find_submitted(app, submit_id),
            submit_id=submit_id,
            policy=self._retry,
            clock=self._clock,
        )

    async def _find_submitted(self, app: str, submit_id: str) -> Machine | None:
        """The machine a create with this submit id made, if any (fresh from a GET)."""
        listed = await self.list_machines(
            include_deleted=True, metadata={SUBMIT_ID_KEY: submit_id}, app=app
        )
        # The server-side metadata filter is documented only in prose; check it here too.
        ours = [m for m in listed if submit_id_of(m) == submit_id]
        if not ours:
            return None
        machine = min(ours, key=lambda m: m.created_at or "")
        try:
            return await self.get_machine(machine.id, app=app)
        except NotFound:
            return machine

    async def get_machine(self, machine_id: str, *, app: str | None = None) -> Machine:
        """One machine; destroyed machines stay readable for a while after they are gone."""
        app = self._app(app)
        data = await self._json(
            "GET",
            machines_path(app, machine_id),
            what="get machine",
            action="get",
            scope=machine_id,
        )
        return parse_model(data, Machine, what="get machine")

    async def update_machine(
        self,
        machine_id: str,
        config: MachineConfig | Mapping[str, Any],
        *,
        current_version: str | None = None,
        skip_launch: bool | None = None,
        nonce: str | None = None,
        app: str | None = None,
    ) -> Machine:
        """Replace the machine's whole config (there is no partial update); a new version boots.

        ``current_version`` (the instance id you last saw) makes the update fail if the machine
        changed in between. Not retried on ambiguous failures.
        """
        app = self._app(app)
        body = UpdateMachineRequest(
            config=config_from(config, what=f"update machine {machine_id}"),
            current_version=current_version,
            skip_launch=skip_launch,
        ).to_api()
        data = await self._json(
            "POST",
            machines_path(app, machine_id),
            what="update machine",
            action="update",
            scope=machine_id,
            idempotent=False,
            json=body,
            nonce=nonce,
        )
        return parse_model(data, Machine, what="update machine")

    async def stop_machine(
        self,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout: float | str | None = None,
        nonce: str | None = None,
        app: str | None = None,
    ) -> None:
        """Stop the machine: send ``signal`` (default SIGINT), then SIGKILL after ``timeout``.

        ``timeout`` is seconds (sent as a Go duration such as "10s") or a duration string.
        """
        body: dict[str, str] = {}
        if signal is not None:
            body["signal"] = signal
        if timeout is not None:
            body["timeout"] = go_duration(timeout)
        await self._machine_action(app, machine_id, "stop", body=body, nonce=nonce)

    async def suspend_machine(
        self, machine_id: str, *, nonce: str | None = None, app: str | None = None
    ) -> None:
        """Suspend the machine (snapshot its memory; the next start resumes it)."""
        await self._machine_action(app, machine_id, "suspend", nonce=nonce)

    async def start_machine(
        self, machine_id: str, *, nonce: str | None = None, app: str | None = None
    ) -> dict[str, Any]:
        """Start a stopped, suspended or created machine; returns the API's answer as a dict."""
        response = await self._machine_action(app, machine_id, "start", nonce=nonce)
        data = parse_json(response.content, what="start machine", redact=self._secrets())
        return dict(data) if isinstance(data, Mapping) else {}

    async def restart_machine(
        self,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout: float | str | None = None,
        force_stop: bool | None = None,
        nonce: str | None = None,
        app: str | None = None,
    ) -> None:
        """Restart the machine in place (same version). Not retried on ambiguous failures."""
        params: Params = []
        if signal is not None:
            params.append(("signal", signal))
        if timeout is not None:
            params.append(("timeout", go_duration(timeout)))
        if force_stop is not None:
            params.append(("force_stop", query_bool(force_stop)))
        await self._machine_action(
            app, machine_id, "restart", params=params, nonce=nonce, idempotent=False
        )

    async def signal_machine(
        self,
        machine_id: str,
        signal: str | int,
        *,
        nonce: str | None = None,
        app: str | None = None,
    ) -> None:
        """Send a signal (a name such as "SIGTERM", or a number) to the machine's process."""
        await self._machine_action(
            app, machine_id, "signal", body={"signal": signal}, nonce=nonce, idempotent=False
        )

    async def delete_machine(
        self,
        machine_id: str,
        *,
        force: bool = False,
        nonce: str | None = None,
        app: str | None = None,
    ) -> None:
        """Destroy the machine; ``force`` kills it if it is running.

        Both ``force`` (documented) and ``kill`` (what fly-go sends) are sent.
        """
        app = self._app(app)
        params = [("force", query_bool(force)), ("kill", query_bool(force))]
        await self._request(
            "DELETE",
            machines_path(app, machine_id),
            action="delete",
            scope=machine_id,
            params=params,
            nonce=nonce,
        )

    async def list_events(self, machine_id: str, *, app: str | None = None) -> list[MachineEvent]:
        """The machine's events, newest first as the API sends them."""
        app = self._app(app)
        data = await self._json(
            "GET",
            machines_path(app, machine_id, "events"),
            what="list events",
            action="events",
            scope=machine_id,
        )
        return parse_models(data, MachineEvent, what="list events")

    async def cordon(
        self, machine_id: str, *, nonce: str | None = None, app: str | None = None
    ) -> None:
        """Take the machine out of the proxy's load balancing."""
        await self._machine_action(app, machine_id, "cordon", nonce=nonce)

    async def uncordon(
        self, machine_id: str, *, nonce: str | None = None, app: str | None = None
    ) -> None:
        """Put the machine back into the proxy's load balancing."""
        await self._machine_action(app, machine_id, "uncordon", nonce=nonce)

    async def _machine_action(
        self,
        app: str | None,
        machine_id: str,
        action: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Params | None = None,
        nonce: str | None = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        """``POST /machines/{id}/{action}``: the shape shared by stop, start, signal, ..."""
        return await self._request(
            "POST",
            machines_path(self._app(app), machine_id, action),
            action=action,
            scope=machine_id,
            idempotent=idempotent,
            params=params or None,
            json=dict(body) if body else None,
            nonce=nonce,
        )

    # -- leases -------------------------------------------------------------------------------

    async def acquire_lease(
        self,
        machine_id: str,
        *,
        ttl: int,
        description: str | None = None,
        nonce: str | None = None,
        app: str | None = None,
    ) -> Lease:
        """Take a lease for ``ttl`` seconds, or refresh ours when ``nonce`` is given.

        A refresh that comes back with another nonce means the lease was lost: ``LeaseError``.
        Someone else's lease raises ``Conflict`` (409).
        """
        app = self._app(app)
        body: dict[str, Any] = {"ttl": ttl}
        if description is not None:
            body["description"] = description
        what = f"lease on machine {machine_id}"
        # TTL in the query (fly-go) and in the body (docs, swagger): servers read one or the other.
        data = await self._json(
            "POST",
            machines_path(app, machine_id, "lease"),
            what=what,
            action="lease",
            scope=machine_id,
            idempotent=nonce is not None,
            params=[("ttl", str(ttl))],
            json=body,
            nonce=nonce,
        )
        lease = parse_lease(data, what=what)
        if nonce is not None and (lease.data is None or lease.data.nonce != nonce):
            raise LeaseError(
                f"the lease on machine {machine_id} was lost: the refresh came back with a "
                "different nonce; stop changing the machine and acquire a new lease"
            )
        return lease

    async def get_lease(self, machine_id: str, *, app: str | None = None) -> Lease:
        """The machine's current lease (``NotFound`` when there is none)."""
        app = self._app(app)
        what = f"get lease of machine {machine_id}"
        data = await self._json(
            "GET",
            machines_path(app, machine_id, "lease"),
            what=what,
            action="get_lease",
            scope=machine_id,
        )
        return parse_lease(data, what=what)

    async def release_lease(self, machine_id: str, nonce: str, *, app: str | None = None) -> None:
        """Give up our lease (the nonce proves it is ours)."""
        app = self._app(app)
        what = f"release lease of machine {machine_id}"
        data = await self._json(
            "DELETE",
            machines_path(app, machine_id, "lease"),
            what=what,
            action="lease",
            scope=machine_id,
            nonce=nonce,
        )
        if data is not None:
            parse_lease(data, what=what)

    # -- metadata -----------------------------------------------------------------------------

    async def get_metadata(self, machine_id: str, *, app: str | None = None) -> dict[str, str]:
        """The machine's metadata as a dict."""
        app = self._app(app)
        data = await self._json(
            "GET",
            machines_path(app, machine_id, "metadata"),
            what="get metadata",
            action="get_metadata",
            scope=machine_id,
        )
        if not isinstance(data, Mapping):
            return {}
        return {str(key): str(value) for key, value in data.items()}

    async def set_metadata(
        self,
        machine_id: str,
        key: str,
        value: str,
        *,
        nonce: str | None = None,
        app: str | None = None,
    ) -> None:
        """Set one metadata key (204)."""
        app = self._app(app)
        await self._request(
            "POST",
            machines_path(app, machine_id, "metadata", key),
            action="metadata",
            scope=machine_id,
            json={"value": value},
            nonce=nonce,
        )

    async def delete_metadata(
        self, machine_id: str, key: str, *, nonce: str | None = None, app: str | None = None
    ) -> None:
        """Remove one metadata key (204)."""
        app = self._app(app)
        await self._request(
            "DELETE",
            machines_path(app, machine_id, "metadata", key),
            action="metadata",
            scope=machine_id,
            nonce=nonce,
        )

    # -- wait ---------------------------------------------------------------------------------

    async def wait(
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
        """Wait up to ``timeout`` seconds (any length) for the machine to reach one of ``state``.

        Raises ``WaitTimeout`` when time runs out, ``MachineDestroyed`` when the machine is gone
        and the state can no longer come, ``NotFound`` when the machine stays unknown for
        ``not_found_grace`` seconds, ``BadRequest`` at once. Transient failures (no answer, 429,
        502-504) are sat out until they have lasted the retry policy's ``max_total`` in a row.
        See wait.py for the loop.
        Given a ``Machine`` and no ``instance_id``, its ``instance_id`` is sent.
        """
        app = self._app(app)
        states = normalize_states(state)
        check_wait_timeout("timeout", timeout)
        check_wait_timeout("not_found_grace", not_found_grace)
        machine_id = machine.id if isinstance(machine, Machine) else machine
        if instance_id is None and isinstance(machine, Machine):
            instance_id = machine.instance_id
        path = machines_path(app, machine_id, "wait")
        identity = {"instance_id": instance_id, "version": version, "from_event_id": from_event_id}
        fixed: Params = [("state", s) for s in states]
        fixed.extend((key, value) for key, value in identity.items() if value is not None)

        async def poll(seconds: int) -> None:
            # The read timeout must outlast the long poll, or every poll would end as an error.
            read = httpx.Timeout(self._timeout, read=seconds + _POLL_READ_MARGIN)
            await self._request(
                "GET",
                path,
                action=None,
                scope=machine_id,
                params=[*fixed, ("timeout", str(seconds))],
                timeout=read,
                # wait_for_state retries transient failures itself, bounded per failure streak
                # rather than per poll, so that a short outage cannot end a long wait.
                retry=NO_RETRY,
            )

        await wait_for_state(
            machine_id=machine_id,
            states=states,
            timeout=timeout,
            not_found_grace=not_found_grace,
            clock=self._clock,
            poll=poll,
            get_machine=lambda: self.get_machine(machine_id, app=app),
            path=path,
            retry=self._retry,
        )

    # -- logs ---------------------------------------------------------------------------------

    async def get_logs(
        self,
        *,
        instance: str | None = None,
        region: str | None = None,
        next_token: str | None = None,
        app: str | None = None,
    ) -> LogsPage:
        """One page of logs; pass the page's ``next_token`` back to read on from there."""
        return await self._logs_page(self._app(app), instance, region, next_token, self._retry)

    def follow_logs(
        self,
        *,
        instance: str | None = None,
        region: str | None = None,
        next_token: str | None = None,
        poll_interval: float = 0.5,
        until: Callable[[], bool] | None = None,
        app: str | None = None,
    ) -> AsyncIterator[LogEntry]:
        """Yield log lines as they arrive, polling like flyctl (see logs.py).

        Stops when ``until()`` is true after an empty page; otherwise runs until the caller
        stops iterating. Raises at once on 401/404, and after 10 errors in a row.
        """
        app = self._app(app)
        # follow_log_pages has its own error backoff, so each page is a single try.
        return follow_log_pages(
            lambda token: self._logs_page(app, instance, region, token, NO_RETRY),
            next_token=next_token,
            poll_interval=poll_interval,
            until=until,
            clock=self._clock,
        )

    async def _logs_page(
        self,
        app: str,
        instance: str | None,
        region: str | None,
        next_token: str | None,
        retry: RequestRetryPolicy,
    ) -> LogsPage:
        # fly-go always sends next_token (empty at first) and leaves out empty filters.
        params: Params = [("next_token", next_token or "")]
        if instance is not None:
            params.append(("instance", instance))
        if region is not None:
            params.append(("region", region))
        data = await self._json(
            "GET",
            logs_path(app),
            what="get logs",
            action=None,
            scope=app,
            params=params,
            logs_api=True,
            retry=retry,
        )
        return parse_logs_page(data)
