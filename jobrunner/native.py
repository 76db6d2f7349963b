"""Native Fly schedules: a persistent machine per ``native = true`` job, its runs in the ledger.

A native job (``schedule = "hourly" | "daily" | "weekly" | "monthly"``, ``native = true``) is not
fired by jobrunner: it is one machine whose ``config.schedule`` makes the platform start it
(fly-machines-api.md section 4.3), so no jobrunner process has to stay up. This module keeps those
machines in line with the job files, and copies what they did into the run ledger.

**Sync.** :func:`plan_sync` compares the app's machines tagged ``jobrunner_schedule`` with the
native jobs and says what to do (a dry run is the plan alone); :func:`apply_sync` does it:

* create: a machine for a job that has none. It boots at once, so a new schedule runs once right
  away, as ``fly machine run --schedule`` does: Fly's docs disagree on whether the interval counts
  from creation or from the first start, and a scheduled machine that never started may never run.
* update: the spec hash (tag ``jobrunner_spec``) differs. Done under a lease (acquire, update with
  its nonce and ``current_version``, release). The new version boots, so it runs once right away.
* destroy: the job is gone, no longer native, or moved to another app; extra machines of one job.
  A job whose ``region`` changed is destroyed and created again (an update cannot move a machine).
* An update or destroy of a machine that is running a scheduled run is *deferred* (left for the
  next sync) unless ``interrupt=True``: it would kill the run.

Syncing twice changes nothing the second time: each machine carries the hash of its config.

**Import.** :func:`import_runs` reads each schedule machine's events. A ``start`` followed by an
``exit`` is one attempt; attempts whose exit says ``restarting`` (``retries.max_attempts > 1``
maps to the restart policy ``on-failure``) continue the same run. Each finished run becomes one
ledger run (trigger ``native``, outcome read as :func:`jobrunner.outcomes.read_outcome` reads it)
with its log lines, in one transaction, keyed by its first attempt's submit id
``native:{machine_id}:{start_timestamp_ms}``, so a second import adds nothing. A run still going
(a start without its exit, or an exit that restarts) is not imported yet: the next import takes
it once it ended. Nor is a run that ended less than ``settle`` seconds ago, whose last log lines
may still be on their way to the logs API.

Log lines are attributed by time: an attempt's lines are its machine's lines logged after the
machine's previous exit (or from a margin before its start, for the first one seen) up to its own
exit (``exited_at``; the exit event's time when that is missing) plus a tail of up to
``LOG_TAIL``, never past the next start, for output read just after the exit. Secret values (the
env values named by the ``jobrunner_secrets`` tag, in every version of the machine's config) are
masked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Literal

import anyio.to_thread

from jobrunner.clock import SYSTEM_CLOCK, Clock
from jobrunner.logsync import (
    START_MARGIN,
    SecretMasker,
    mask_entries,
    parse_ts,
    stream_of,
    token_for,
)
from jobrunner.machines import (
    AsyncMachinesClient,
    LeaseError,
    MachinesAPIError,
    MachinesError,
    NotFound,
)
from jobrunner.machines.models import LogEntry, Machine, MachineConfig, MachineEvent, Restart
from jobrunner.outcomes import read_outcome
from jobrunner.runner import MANAGED_TAG
from jobrunner.spec import Job
from jobrunner.spec.job import SNAPSHOT_FORMAT
from jobrunner.spec.schedule import NATIVE_INTERVALS
from jobrunner.store import LogLineIn, Run, RunRequest, SqlLedger, Store

__all__ = [
    "LEASE_TTL",
    "LOG_SETTLE",
    "LOG_TAIL",
    "SCHEDULE_TAG",
    "SECRETS_TAG",
    "SPEC_TAG",
    "TRIGGER",
    "ImportReport",
    "NativeRun",
    "SyncAction",
    "SyncResult",
    "apply_sync",
    "import_runs",
    "native_config",
    "native_runs",
    "plan_sync",
    "spec_hash",
    "sync_lines",
    "sync_report",
]

logger = logging.getLogger(__name__)

SCHEDULE_TAG = "jobrunner_schedule"
SPEC_TAG = "jobrunner_spec"
SECRETS_TAG = "jobrunner_secrets"
TRIGGER = "native"
LEASE_TTL = 60
# flyctl waits up to 20 s for a release command's logs to arrive.
LOG_SETTLE = 20.0
# A run's last lines may be stamped a little after its exit.
LOG_TAIL = timedelta(seconds=2)
# Metadata the client or the platform adds, which says nothing about the job.
_VOLATILE_TAGS = frozenset({SPEC_TAG, "jobrunner_submit_id"})
_RUNNING = frozenset(
    {"starting", "started", "stopping", "restarting", "replacing", "updating", "suspending"}
)
_GONE = frozenset({"destroying", "destroyed", "replaced"})
_MAX_LOG_PAGES = 10_000

SyncKind = Literal["create", "update", "destroy", "unchanged"]
SyncStatus = Literal["done", "unchanged", "deferred", "failed"]


# ----- machine config ------------------------------------------------------------------------


def native_config(job: Job, *, environ: Mapping[str, str]) -> MachineConfig:
    """The persistent machine config of a native job: ``schedule`` set, ``auto_destroy`` off,
    restart policy ``no`` (``on-failure`` with ``max_attempts - 1`` retries when the job has
    ``retries.max_attempts > 1``; the other retry rules cannot be expressed on Fly), and the tags
    ``jobrunner_managed``, ``jobrunner_schedule``, ``jobrunner_secrets`` (secret names, when
    any) and ``jobrunner_spec`` (:func:`spec_hash`). Secrets are read from ``environ``
    (``JobSpecError`` names a missing one); raises ``ValueError`` for a job that is not native."""
    if not job.native or job.schedule not in NATIVE_INTERVALS:
        raise ValueError(
            f"job {job.name} is not a native schedule (it needs native = true and schedule = "
            f"one of {', '.join(NATIVE_INTERVALS)})"
        )
    tags = {MANAGED_TAG: "true", SCHEDULE_TAG: job.name}
    if job.secrets:
        tags[SECRETS_TAG] = ",".join(job.secrets)
    attempts = job.retries.max_attempts
    restart = (
        Restart(policy="no")
        if attempts <= 1
        else Restart(policy="on-failure", max_retries=attempts - 1)
    )
    config = job.to_machine_config(environ=environ, metadata=tags).model_copy(
        update={"schedule": job.schedule, "auto_destroy": False, "restart": restart}
    )
    return config.model_copy(
        update={"metadata": {**(config.metadata or {}), SPEC_TAG: spec_hash(config)}}
    )


def spec_hash(config: MachineConfig) -> str:
    """A stable hash of ``config`` as sent to the API, leaving out the ``jobrunner_spec`` tag.

    It covers secret values (a rotated secret updates the machine); the config itself carries
    them in ``env``, readable with the same token, so the hash exposes nothing more."""
    data = config.to_api()
    data["metadata"] = {
        k: v for k, v in (data.get("metadata") or {}).items() if k not in _VOLATILE_TAGS
    }
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ----- sync ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncAction:
    """One step of a sync: what to do to which schedule's machine, and why."""

    kind: SyncKind
    job_name: str
    machine_id: str | None
    reason: str
    app: str
    region: str | None = None
    state: str | None = None  # the machine's state when planned
    config: MachineConfig | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "job": self.job_name,
            "machine_id": self.machine_id,
            "reason": self.reason,
            "app": self.app,
            "region": self.region,
            "state": self.state,
        }


@dataclass(frozen=True)
class SyncResult:
    """What applying one action did: ``done``, ``unchanged``, ``deferred`` (the machine was
    running a scheduled run; sync again later, or with ``interrupt``) or ``failed``."""

    action: SyncAction
    status: SyncStatus
    machine_id: str | None
    message: str

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_json(self) -> dict[str, Any]:
        return {
            **self.action.to_json(),
            "status": self.status,
            "machine_id": self.machine_id,
            "message": self.message,
        }


async def plan_sync(
    client: AsyncMachinesClient,
    jobs: Sequence[Job],
    *,
    app: str,
    environ: Mapping[str, str] | None = None,
) -> list[SyncAction]:
    """What :func:`apply_sync` must do so that ``app`` holds exactly one up-to-date machine per
    native job of ``jobs`` whose ``app`` is ``app`` (or unset), and no other schedule machine.
    Secrets are read from ``environ`` (default: ``os.environ``).

    Changes nothing. Actions come sorted by job name, a destroy before the create that replaces
    it. Raises ``JobSpecError`` for a job whose secrets are not in ``environ``, ``ValueError``
    for two native jobs of one name, ``MachinesError`` when the machines cannot be listed."""
    environ = os.environ if environ is None else environ
    desired: dict[str, tuple[Job, MachineConfig]] = {}
    for job in jobs:
        if job.native and (job.app or app) == app:
            if job.name in desired:
                raise ValueError(f"two native jobs are named {job.name!r}")
            desired[job.name] = (job, native_config(job, environ=environ))
    others = {job.name: job for job in jobs if job.name not in desired}
    by_name: dict[str, list[Machine]] = {}
    for machine in await client.list_machines(metadata={MANAGED_TAG: "true"}, app=app):
        name = machine.metadata_value(SCHEDULE_TAG)
        if name and machine.metadata_value(MANAGED_TAG) == "true" and machine.state not in _GONE:
            by_name.setdefault(name, []).append(machine)
    actions: list[SyncAction] = []
    for name in sorted(set(desired) | set(by_name)):
        machines = sorted(by_name.get(name, []), key=lambda m: (m.created_at or "", m.id))
        if name in desired:
            job, config = desired[name]
            actions.extend(_plan_job(job, config, machines, app))
        else:
            why = _gone_reason(others.get(name), app)
            actions.extend(_action("destroy", name, m, why, app) for m in machines)
    return actions


def _plan_job(
    job: Job, config: MachineConfig, machines: list[Machine], app: str
) -> list[SyncAction]:
    wanted = (config.metadata or {})[SPEC_TAG]
    create = SyncAction(
        "create",
        job.name,
        None,
        f"no machine yet: create one that runs {job.schedule}",
        app,
        region=job.region,
        config=config,
    )
    if not machines:
        return [create]
    keeper = next((m for m in machines if m.metadata_value(SPEC_TAG) == wanted), machines[0])
    actions = [
        _action("destroy", job.name, m, f"another machine ({keeper.id}) runs this job", app)
        for m in machines
        if m is not keeper
    ]
    if job.region is not None and keeper.region != job.region:
        why = f"the region changed ({keeper.region} -> {job.region}); a machine cannot move"
        return [*actions, _action("destroy", job.name, keeper, why, app), create]
    current = keeper.config or keeper.incomplete_config
    if keeper.metadata_value(SPEC_TAG) == wanted and current and current.schedule == job.schedule:
        why = f"up to date (spec {wanted[:12]})"
        return [*actions, _action("unchanged", job.name, keeper, why, app)]
    changed = _changed_keys(current, config)
    why = "the job changed: " + (", ".join(changed) if changed else "its spec hash differs")
    return [*actions, _action("update", job.name, keeper, why, app, config=config)]


def _action(
    kind: SyncKind,
    name: str,
    machine: Machine,
    reason: str,
    app: str,
    config: MachineConfig | None = None,
) -> SyncAction:
    return SyncAction(
        kind, name, machine.id, reason, app, machine.region, machine.state, config=config
    )


def _gone_reason(job: Job | None, app: str) -> str:
    if job is None:
        return "its job is gone"
    if not job.native:
        return "its job is no longer a native schedule"
    return f"its job now runs in app {job.app}, not {app}"


def _changed_keys(current: MachineConfig | None, wanted: MachineConfig) -> list[str]:
    have = current.to_api() if current is not None else {}
    changed: list[str] = []
    for key, value in wanted.to_api().items():
        if key == "metadata":
            mine = {k: v for k, v in value.items() if k not in _VOLATILE_TAGS}
            theirs = {k: v for k, v in (have.get(key) or {}).items() if k not in _VOLATILE_TAGS}
            if mine != theirs:
                changed.append(key)
        elif have.get(key) != value:
            changed.append(key)
    return changed


async def apply_sync(
    client: AsyncMachinesClient,
    actions: Sequence[SyncAction],
    *,
    app: str | None = None,
    interrupt: bool = False,
    lease_ttl: int = LEASE_TTL,
) -> list[SyncResult]:
    """Carry out ``actions`` (from :func:`plan_sync`, which put their app in them) in order;
    one result each. A failed action (an API error, a lease someone else holds) is reported in
    its result and the others still run. ``app``, when given, must be the actions' app."""
    stray = sorted({a.app for a in actions if app is not None and a.app != app})
    if stray:
        raise ValueError(f"actions planned for app(s) {', '.join(stray)} applied to app {app}")
    results: list[SyncResult] = []
    for action in actions:
        try:
            results.append(await _apply(client, action, interrupt, lease_ttl))
        except MachinesError as exc:
            logger.warning(
                "sync of schedule %s failed: %s", action.job_name, exc, extra={"action": "sync"}
            )
            results.append(SyncResult(action, "failed", action.machine_id, str(exc)))
    return results


async def _apply(
    client: AsyncMachinesClient, action: SyncAction, interrupt: bool, lease_ttl: int
) -> SyncResult:
    if action.kind == "unchanged":
        return SyncResult(action, "unchanged", action.machine_id, action.reason)
    if action.kind == "create":
        if action.config is None:
            raise ValueError(f"create action for {action.job_name} has no config")
        machine = await client.create_machine(action.config, region=action.region, app=action.app)
        return SyncResult(action, "done", machine.id, f"created machine {machine.id}")
    if action.machine_id is None:
        raise ValueError(f"{action.kind} action for {action.job_name} names no machine")
    machine_id = action.machine_id
    try:
        lease = await client.acquire_lease(
            machine_id, ttl=lease_ttl, description="jobrunner schedules sync", app=action.app
        )
    except NotFound:
        if action.kind != "destroy":
            raise
        return SyncResult(action, "unchanged", machine_id, f"machine {machine_id} is gone already")
    nonce = lease.data.nonce if lease.data is not None else None
    if not nonce:
        raise LeaseError(f"the lease on machine {machine_id} came back without a nonce")
    released = False
    try:
        machine = await client.get_machine(machine_id, app=action.app)
        if machine.state in _RUNNING and not interrupt:
            return SyncResult(
                action,
                "deferred",
                machine_id,
                f"machine {machine_id} is {machine.state} (a scheduled run is going); "
                "sync again later, or interrupt it",
            )
        if action.kind == "destroy":
            force = machine.state in _RUNNING
            await client.delete_machine(machine_id, force=force, nonce=nonce, app=action.app)
            released = True  # the lease went with the machine
            return SyncResult(action, "done", machine_id, f"destroyed machine {machine_id}")
        return await _update(client, action, machine, nonce)
    finally:
        if not released:
            with contextlib.suppress(MachinesError):
                await client.release_lease(machine_id, nonce, app=action.app)


async def _update(
    client: AsyncMachinesClient, action: SyncAction, machine: Machine, nonce: str
) -> SyncResult:
    if action.config is None:
        raise ValueError(f"update action for {action.job_name} has no config")
    wanted = (action.config.metadata or {}).get(SPEC_TAG)
    if machine.metadata_value(SPEC_TAG) == wanted:  # someone synced it since the plan
        return SyncResult(action, "unchanged", machine.id, "already up to date")
    await client.update_machine(
        machine.id,
        action.config,
        current_version=machine.instance_id,
        nonce=nonce,
        app=action.app,
    )
    return SyncResult(action, "done", machine.id, f"updated machine {machine.id}")


def sync_report(
    actions: Sequence[SyncAction],
    results: Sequence[SyncResult],
    imported: ImportReport | None,
    *,
    dry_run: bool,
) -> dict[str, Any]:
    """The JSON answer of ``jobrunner schedules sync``: the plan (dry run) or what was done, and
    the import. ``ok`` is false when an action failed or a machine could not be imported."""
    failed = any(not r.ok for r in results) or bool(imported and imported.errors)
    return {
        "dry_run": dry_run,
        "ok": not failed,
        "actions": [r.to_json() for r in results] if results else [a.to_json() for a in actions],
        "import": imported.to_json() if imported is not None else None,
    }


def sync_lines(report: Mapping[str, Any]) -> list[str]:
    """:func:`sync_report` as lines for a terminal, one per action, then the import."""
    lines: list[str] = []
    verb = "would " if report.get("dry_run") else ""
    for item in report.get("actions", []):
        machine = item.get("machine_id") or "(new)"
        status = item.get("status")
        head = f"{item['job']}: {verb}{item['kind']} {machine}"
        if status in (None, "unchanged"):
            detail = item["reason"]
        elif status == "done":
            detail = f"{item['message']} ({item['reason']})"
        else:
            detail = f"{status}: {item['message']}"
        lines.append(f"{head} - {detail}")
    if not lines:
        lines.append("no native schedules, and no schedule machines")
    summary = report.get("import")
    if summary:
        lines.append(
            f"imported {len(summary['imported'])} run(s) with {summary['log_lines']} log "
            f"line(s) from {summary['machines']} machine(s); {summary['already']} already "
            f"recorded, {summary['waiting']} still going"
        )
        lines.extend(f"import failed: {error}" for error in summary["errors"])
    return lines


# ----- import --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NativeRun:
    """One finished run in a schedule machine's history: its (start, exit) event pairs."""

    machine_id: str
    key: str  # the submit id of its first attempt
    attempts: tuple[tuple[MachineEvent, MachineEvent], ...]

    def submit_id(self, number: int) -> str:
        return self.key if number == 1 else f"{self.key}:a{number}"


@dataclass
class ImportReport:
    """What :func:`import_runs` did: the runs it recorded, and what it left."""

    imported: list[Run] = field(default_factory=list)
    already: int = 0  # finished runs that were in the ledger already
    waiting: int = 0  # runs still going, or ended less than ``settle`` seconds ago
    log_lines: int = 0
    machines: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "imported": [r.id for r in self.imported],
            "already": self.already,
            "waiting": self.waiting,
            "log_lines": self.log_lines,
            "machines": self.machines,
            "errors": list(self.errors),
        }


def native_runs(
    machine_id: str, events: Iterable[MachineEvent], *, settled: bool
) -> tuple[list[NativeRun], bool]:
    """The finished runs in a machine's events (any order), oldest first, and whether a run is
    still going (started without its exit, or its last exit restarts).

    A run is attempts: a ``start`` (``started`` preferred over the ``starting`` request) paired
    with the next ``exit``; an exit with ``restarting`` continues the run. ``settled`` (the
    machine is at rest) ends a run whose last exit said it would restart but that never did.
    Events at one millisecond keep the API's order (newest first, reversed)."""
    ordered = sorted(reversed(list(events)), key=lambda e: e.timestamp)
    finished: list[list[tuple[MachineEvent, MachineEvent]]] = []
    current: list[tuple[MachineEvent, MachineEvent]] = []
    open_start: MachineEvent | None = None
    for event in ordered:
        if event.type == "start":
            if open_start is None or event.status != "starting":
                open_start = event
        elif event.type == "exit":
            # A restart that failed to launch exits without a start of its own.
            start = open_start or (event if current else None)
            if start is None:
                continue  # its start is older than the history the API keeps
            current.append((start, event))
            open_start = None
            if not _restarting(event):
                finished.append(current)
                current = []
    if current and open_start is None and settled:
        finished.append(current)
        current = []
    going = open_start is not None or bool(current)
    keyed: list[NativeRun] = []
    seen: dict[str, int] = {}
    for attempts in finished:
        base = f"native:{machine_id}:{attempts[0][0].timestamp}"
        seen[base] = seen.get(base, 0) + 1  # two starts in one millisecond (a fake clock)
        key = base if seen[base] == 1 else f"{base}.{seen[base]}"
        keyed.append(NativeRun(machine_id, key, tuple(attempts)))
    return keyed, going


async def import_runs(
    client: AsyncMachinesClient,
    ledger_store: Store | SqlLedger,
    *,
    app: str,
    backend: str,
    jobs: Sequence[Job] = (),
    settle: float = LOG_SETTLE,
    clock: Clock = SYSTEM_CLOCK,
) -> ImportReport:
    """Record in the ledger every finished run of ``app``'s schedule machines (destroyed ones
    too, while the API still shows them) that it does not hold yet, with its log lines.

    ``jobs`` gives the snapshots stored with the runs (the job as it is now); for a schedule not
    among them one is rebuilt from its machine's config. A machine whose events or logs cannot be
    read is named in ``errors`` and the others are still imported."""
    store = ledger_store.store if isinstance(ledger_store, SqlLedger) else ledger_store
    importer = _Importer(client, store, app, backend, settle, clock, {j.name: j for j in jobs})
    machines = await client.list_machines(
        include_deleted=True, metadata={MANAGED_TAG: "true"}, app=app
    )
    for machine in machines:
        name = machine.metadata_value(SCHEDULE_TAG)
        if not name or machine.metadata_value(MANAGED_TAG) != "true":
            continue
        importer.report.machines += 1
        try:
            await importer.machine(machine, name)
        except MachinesError as exc:
            importer.report.errors.append(f"machine {machine.id} (schedule {name}): {exc}")
    return importer.report


class _Importer:
    def __init__(
        self,
        client: AsyncMachinesClient,
        store: Store,
        app: str,
        backend: str,
        settle: float,
        clock: Clock,
        jobs: Mapping[str, Job],
    ) -> None:
        self.client = client
        self.store = store
        self.app = app
        self.backend = backend
        self.settle = timedelta(seconds=settle)
        self.clock = clock
        self.jobs = jobs
        self.report = ImportReport()

    async def machine(self, machine: Machine, name: str) -> None:
        events = await self._events(machine)
        runs, going = native_runs(machine.id, events, settled=machine.state not in _RUNNING)
        self.report.waiting += int(going)
        if not runs:
            return
        keys = {run.key for run in runs}
        known = await anyio.to_thread.run_sync(self.store.existing_submit_ids, keys)
        self.report.already += len(keys & known)
        cutoff = self.clock.now() - self.settle
        new = [r for r in runs if r.key not in known]
        ready = [r for r in new if _exit_time(r.attempts[-1][1]) <= cutoff]
        self.report.waiting += len(new) - len(ready)
        if not ready:
            return
        windows = _log_windows(runs)
        since = windows[ready[0].key, 1][0]
        until = windows[ready[-1].key, len(ready[-1].attempts)][1]
        entries = await self._lines(machine.id, since, until)
        config = machine.config or machine.incomplete_config or MachineConfig()
        masker = await self._masker(machine, config)
        for run in ready:
            await self._record(machine, name, config, run, windows, entries, masker)

    async def _events(self, machine: Machine) -> list[MachineEvent]:
        # The events endpoint is in the swagger only; a GET of the machine carries them too.
        with contextlib.suppress(NotFound):
            return await self.client.list_events(machine.id, app=self.app)
        with contextlib.suppress(NotFound):
            return (await self.client.get_machine(machine.id, app=self.app)).events
        return machine.events

    async def _masker(self, machine: Machine, config: MachineConfig) -> SecretMasker:
        """Masks the secrets of every version of the machine (older runs ran older secrets)."""
        configs = [config]
        with contextlib.suppress(MachinesAPIError):  # the versions endpoint: swagger only
            versions = await self.client.list_versions(machine.id, app=self.app)
            configs.extend(v.user_config for v in versions if v.user_config is not None)
        return SecretMasker((c.env or {}).get(n, "") for c in configs for n in _secret_names(c))

    async def _lines(self, machine_id: str, since: datetime, until: datetime) -> list[LogEntry]:
        """The machine's log lines after ``since`` up to ``until``, oldest first."""
        token = token_for(since)
        found: list[LogEntry] = []
        for _ in range(_MAX_LOG_PAGES):
            page = await self.client.get_logs(instance=machine_id, next_token=token, app=self.app)
            for entry in page.entries:
                if entry.instance not in (None, "", machine_id):
                    continue
                if parse_ts(entry.timestamp) > until:
                    return found
                found.append(entry)
            if not page.entries or not page.next_token or page.next_token == token:
                break
            token = page.next_token
        return found

    async def _record(
        self,
        machine: Machine,
        name: str,
        config: MachineConfig,
        run: NativeRun,
        windows: Mapping[tuple[str, int], tuple[datetime, datetime]],
        entries: Sequence[LogEntry],
        masker: SecretMasker,
    ) -> None:
        fields: list[dict[str, Any]] = []
        logs: dict[int, list[LogLineIn]] = {}
        for number, pair in enumerate(run.attempts, start=1):
            start, end = pair
            # The same reading as a one-off run's: this pair is the machine's latest run.
            alone = Machine(id=machine.id, state="stopped", events=[end, start])
            result = read_outcome(machine.id, alone, None)
            fields.append(
                {
                    "submit_id": run.submit_id(number),
                    "machine_id": machine.id,
                    "region": machine.region,
                    "state": "finished",
                    "outcome": result.outcome,
                    "exit_code": result.exit_code,
                    "oom_killed": result.oom_killed,
                    "signal": result.signal,
                    "requested_stop": result.requested_stop,
                    "reason": masker.mask(result.reason) if result.reason else None,
                    "started_at": _event_time(start),
                    "finished_at": _event_time(end),
                }
            )
            lower, upper = windows[run.key, number]
            mine = [e for e in entries if lower < parse_ts(e.timestamp) <= upper]
            logs[number] = [
                LogLineIn(
                    ts=parse_ts(e.timestamp),
                    message=text,  # masked, secrets cut across two lines included
                    stream=stream_of(e),
                    entry_id=e.id or None,
                )
                for e, text in zip(mine, mask_entries(masker, mine), strict=True)
            ]
        last = fields[-1]
        restart = config.restart or Restart()
        allowed = (restart.max_retries or 0) + 1 if restart.policy == "on-failure" else 1
        job = self.jobs.get(name)
        request = RunRequest(
            job_name=name,
            job_snapshot=job.snapshot() if job is not None else _snapshot_from(name, config),
            backend=self.backend,
            app=self.app,
            region=machine.region,
            max_attempts=max(allowed, len(fields)),
            timeout_s=None,
            trigger=TRIGGER,
        )
        recorded = await anyio.to_thread.run_sync(
            partial(
                self.store.import_finished_run,
                request,
                outcome=last["outcome"],
                exit_code=last["exit_code"],
                reason=last["reason"],
                started_at=fields[0]["started_at"],
                finished_at=last["finished_at"],
                attempt_fields=fields,
                logs=logs,
                started_reason=f"started by its {config.schedule} schedule on machine {machine.id}",
            )
        )
        if recorded is None:  # another importer was quicker
            self.report.already += 1
            return
        self.report.imported.append(recorded)
        self.report.log_lines += sum(len(lines) for lines in logs.values())


def _restarting(event: MachineEvent) -> bool:
    details = event.exit_event()
    return bool(details is not None and details.restarting)


def _event_time(event: MachineEvent) -> datetime:
    return datetime.fromtimestamp(event.timestamp / 1000, UTC)


def _exit_time(event: MachineEvent) -> datetime:
    """When the machine exited: ``exited_at`` when given, else the event's time."""
    details = event.exit_event()
    if details is not None and details.exited_at:
        with contextlib.suppress(ValueError):
            parsed = datetime.fromisoformat(details.exited_at.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return _event_time(event)


def _log_windows(runs: Sequence[NativeRun]) -> dict[tuple[str, int], tuple[datetime, datetime]]:
    """Each attempt's log times, by (run key, attempt number): after the machine's previous
    exit (or from a margin before the first start seen) up to its own exit, plus its tail:
    up to ``LOG_TAIL`` for output read just after the exit, never past the next start. No tails
    when an exit's ``exited_at`` and its event time disagree: the events then come from another
    clock than the lines (a local backend on a fake clock), so starts cannot bound a tail."""
    pairs = [(run.key, n, pair) for run in runs for n, pair in enumerate(run.attempts, start=1)]
    one_clock = all(
        abs(_exit_time(end) - _event_time(end)) <= timedelta(seconds=1) for _, _, (_, end) in pairs
    )
    windows: dict[tuple[str, int], tuple[datetime, datetime]] = {}
    previous: datetime | None = None
    for index, (key, number, (start, end)) in enumerate(pairs):
        tail = timedelta(0)
        if one_clock:
            following = pairs[index + 1][2][0] if index + 1 < len(pairs) else None
            room = _event_time(following) - _event_time(end) if following else LOG_TAIL
            tail = max(timedelta(0), min(LOG_TAIL, room))
        lower = previous if previous is not None else _event_time(start) - START_MARGIN
        upper = max(_exit_time(end) + tail, lower)
        windows[key, number] = (lower, upper)
        previous = upper
    return windows


def _secret_names(config: MachineConfig) -> list[str]:
    raw = (config.metadata or {}).get(SECRETS_TAG, "")
    return [name for name in raw.split(",") if name]


def _snapshot_from(name: str, config: MachineConfig) -> dict[str, Any]:
    """A job snapshot rebuilt from a schedule machine's config (its job file is not at hand)."""
    secrets = _secret_names(config)
    data: dict[str, Any] = {
        "name": name,
        "image": config.image or "",
        "schedule": config.schedule,
        "native": True,
        "env": {k: v for k, v in (config.env or {}).items() if k not in secrets},
        "secrets": secrets,
        "metadata": {
            k: v
            for k, v in (config.metadata or {}).items()
            if not k.startswith(("jobrunner_", "fly_"))
        },
        "format": SNAPSHOT_FORMAT,
        "source_path": None,
    }
    if config.init is not None:
        for key in ("exec", "entrypoint", "cmd"):
            value = getattr(config.init, key)
            if value:
                data[key] = list(value)
    return data
