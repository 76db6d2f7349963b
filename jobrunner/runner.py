"""A run's life: create the machine, wait for its exit by instance_id, record the outcome, retry.

There is one path from "a run row exists" to "its outcome is recorded": ``Runner.drive``. The
CLI's ``run``, ``wait``, ``runs reconcile``, the Python API and the worker all call it, so a run
left half-done by a crashed process is finished by whoever drives it next, from the ledger plus
the API.

Crash safety rests on three rules:
1. the run row and each attempt row are committed before the API call that depends on them;
2. every machine is created with a deterministic ``jobrunner_submit_id`` tag
   (``<run id>.<attempt>``), so a process that resumes an attempt whose create may or may not
   have happened finds the machine by listing ``metadata.jobrunner_submit_id=...`` first;
3. ``finish_run`` is a conditional update, so an outcome is recorded exactly once even when two
   processes race.

A run is driven by one process at a time: it holds a claim in the ledger (owner + expiry). The
bookkeeping is per runner, not per run, so that one worker can drive thousands of runs: one
service task renews all of this runner's claims in one statement and finds cancel requests for
all of its runs in one query, and one log fan-out polls the logs API once per app for every
machine it follows. A drive costs, when its machine exits within one wait, three Machines API
calls: create, wait for ``stopped``, and the read of the exit event.

Nothing sleeps while holding a claim: a retry puts the run back to ``pending`` with its
``next_attempt_at`` and releases the claim, and whoever is due to drive it (the waiting caller, a
worker) claims it again when the time comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

from jobrunner.claims import CLAIM_TTL, RunBusy, new_owner_id, owner_is_alive
from jobrunner.clock import SYSTEM_CLOCK, Clock
from jobrunner.errors import JobrunnerError
from jobrunner.events import EventHandler, RunEvent, ignore_events
from jobrunner.logfanout import LogFanout
from jobrunner.logsync import SecretMasker
from jobrunner.machines import AsyncMachinesClient
from jobrunner.machines.create import is_ambiguous, submit_id_of
from jobrunner.machines.errors import (
    Conflict,
    InsufficientCapacity,
    MachineDestroyed,
    MachinesAPIError,
    NotFound,
    WaitTimeout,
)
from jobrunner.machines.models import Machine
from jobrunner.machines.retry import is_transient
from jobrunner.outcomes import TERMINAL, AttemptResult, read_outcome
from jobrunner.spec import Job, JobSpecError
from jobrunner.store import Attempt, BlobNotFound, Ledger, Run, SqlLedger, Store

logger = logging.getLogger(__name__)

# Re-exported: the CLI and callers import these from here.
__all__ = [
    "TERMINAL",
    "AttemptResult",
    "ReconcileReport",
    "RunBusy",
    "Runner",
    "WrongBackend",
    "owner_is_alive",
    "sole_error",
]

NO_DEADLINE = 10 * 365 * 86400.0
MANAGED_TAG = "jobrunner_managed"
# How often the service task looks for cancel requests of this runner's runs (one query for all).
CANCEL_POLL = 1.0
# The first wait for an exit is this short, so a job that runs longer is shown as running within
# a second (one more API call: reading its start event); a job that ends sooner costs no more
# than create, wait and the read of its exit. Later waits are the API's full 60 s long polls (or
# shorter, up to the job's deadline).
FIRST_WAIT = 1.0
LONG_WAIT = 60.0
# How long closing a runner waits, beyond the drain grace, for log lines still being copied.
CLOSE_DRAIN_MARGIN = 5.0
# Log lines of attempts that finished this long ago are no longer kept by the logs API (Fly keeps
# about 7 days), so a lost drain older than this is not retried.
LOGS_KEPT = timedelta(days=7)
# Drives at once in ``reconcile``; orphans are claimed in batches of this many.
RECONCILE_CONCURRENCY = 8
RECONCILE_BATCH = 64


class WrongBackend(JobrunnerError):
    """The run was submitted to another backend than the one this runner talks to."""

    def __init__(self, run: Run, backend: str) -> None:
        super().__init__(
            f"run {run.id} runs on the {run.backend} backend, not {backend}; "
            f"use --backend {run.backend} (or JOBRUNNER_BACKEND={run.backend}) for it"
        )


@dataclass
class _Drive:
    """Per-run state shared by the attempt loop and the runner's service task."""

    run_id: str
    cancel: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope | None = None
    lost_claim: bool = False
    released: bool = False  # the claim was let go with the outcome or requeue
    machines: list[str] = field(default_factory=list)


@dataclass
class ReconcileReport:
    """What ``Runner.reconcile`` did: the runs it finished or left, and those it could not."""

    runs: list[Run] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # run id -> why it could not finish
    logs_recovered: int = 0  # finished attempts whose last log lines were copied here


def machine_metadata(run: Run, attempt: Attempt, job: Job) -> dict[str, str]:
    return {
        MANAGED_TAG: "true",
        "jobrunner_run_id": run.id,
        "jobrunner_attempt": str(attempt.number),
        "jobrunner_job": job.name,
        "jobrunner_submit_id": attempt.submit_id,
    }


def _event_time(timestamp_ms: int) -> datetime:
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC)


class Runner:
    """Drives runs of jobs on one Machines API (Fly or the local backend) into a ledger.

    Use it as an async context manager (``async with Runner(...) as runner``), or just call it:
    its service task (claim renewal, cancel polling, log fan-out) starts with the first drive and
    stops when nothing is left to drive or drain. ``aclose()`` stops it at once.
    """

    def __init__(
        self,
        client: AsyncMachinesClient,
        ledger: Ledger | Store,
        *,
        backend: str,
        app: str,
        environ: Mapping[str, str] | None = None,
        on_event: EventHandler = ignore_events,
        log_poll_interval: float = 0.5,
        log_drain_grace: float = 1.0,
        start_poll: float = FIRST_WAIT,
        clock: Clock = SYSTEM_CLOCK,
        owner: str | None = None,
    ) -> None:
        self.client = client
        self.ledger: Ledger = SqlLedger(ledger) if isinstance(ledger, Store) else ledger
        self.backend = backend
        self.app = app
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self.on_event = on_event
        self.owner = owner or new_owner_id()
        self.clock = clock
        self._first_wait = start_poll
        self._log_grace = log_drain_grace
        self._drives: dict[str, _Drive] = {}
        self.logs = LogFanout(
            client,
            self.ledger.add_logs,
            on_event=self._forward_event,
            poll_interval=log_poll_interval,
            drain_grace=log_drain_grace,
            clock=clock,
            on_copied=self._logs_copied,
        )
        self._service: asyncio.Task[None] | None = None
        # Runs ended here because their recorded job could not be read (reconcile reports them).
        self._unrunnable: dict[str, str] = {}
        self._service_idle = anyio.Event()

    # ---- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Runner:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Let the log lines in flight land (bounded by the drain grace), then stop the service
        task. Claims are released by the drives themselves."""
        with anyio.move_on_after(self._log_grace + CLOSE_DRAIN_MARGIN):
            while self.logs.busy and self._service is not None and not self._service.done():
                await anyio.sleep(0.02)
        task, self._service = self._service, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _forward_event(self, event: RunEvent) -> None:
        self.on_event(event)

    def _emit(self, kind: Any, run_id: str, message: str = "", **extra: Any) -> None:
        self.on_event(RunEvent(kind=kind, run_id=run_id, message=message, **extra))

    def _ensure_service(self) -> None:
        if self._service is None or self._service.done():
            self._service = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        """Renew every claim of this runner, pass on cancel requests, and run the log fan-out,
        for as long as something is driven or drained."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.logs.run)
            last_renew = self.clock.monotonic()
            while self._drives or self.logs.busy:
                await self.clock.sleep(CANCEL_POLL)
                if not self._drives:
                    continue
                try:
                    for run_id in await self.ledger.cancel_requests(self.owner):
                        drive = self._drives.get(run_id)
                        if drive is not None:
                            drive.cancel.set()
                    if self.clock.monotonic() - last_renew >= CLAIM_TTL / 3:
                        held = await self.ledger.renew_claims(self.owner, CLAIM_TTL)
                        last_renew = self.clock.monotonic()
                        self._drop_lost(held)
                except JobrunnerError as exc:
                    # A ledger outage must not end the drives: the claim's TTL gives it time.
                    logger.warning("renewing claims failed (will retry): %s", exc)
            tg.cancel_scope.cancel()

    def _drop_lost(self, held: set[str]) -> None:
        for run_id, drive in list(self._drives.items()):
            if run_id not in held and not drive.lost_claim:
                # Someone else took the run over (we were presumed dead): stop touching it.
                drive.lost_claim = True
                logger.warning("lost the claim on run %s; another process drives it now", run_id)
                if drive.scope is not None:
                    drive.scope.cancel()

    # ---- public API -------------------------------------------------------------------------

    async def submit(self, job: Job, *, trigger: str = "python", claim: bool = True) -> Run:
        """Record a new run of ``job`` (state ``pending``); nothing is created on the API yet.

        With ``claim`` (the default) the run is born claimed by this runner, which is about to
        drive it, so no worker can take it meanwhile. The job's secrets are checked now, so a run
        that cannot start is refused before it exists.
        """
        # Raises JobSpecError early (the secrets are all the config can miss); the config itself,
        # with every file base64-encoded, is built only when the machine is created.
        job.secret_env(self.environ)
        run = await self.ledger.create_run(
            job_name=job.name,
            job_snapshot=job.snapshot(),
            backend=self.backend,
            app=job.app or self.app,
            region=job.region,
            max_attempts=job.retries.max_attempts,
            timeout_s=job.timeout,
            trigger=trigger,
            owner=self.owner if claim else None,
            owner_ttl_s=CLAIM_TTL,
        )
        self._emit("state", run.id, "submitted", state="pending")
        return run

    async def run(self, job: Job, *, trigger: str = "python") -> Run:
        """Submit ``job``, drive it (through any retries) to its outcome, and return once its
        log lines are copied too."""
        run = await self.submit(job, trigger=trigger)
        final = await self.wait(run.id)
        await self.logs_settled(final.id)
        return final

    def request_cancel_local(self, run_id: str) -> None:
        """Ask a run this process is driving to stop (used by the CLI's Ctrl-C)."""
        drive = self._drives.get(run_id)
        if drive is not None:
            drive.cancel.set()

    async def cancel(self, run_id: str) -> Run:
        """Cancel a run: flag it in the ledger; if nobody is driving it, stop its machine here."""
        run = await self.ledger.get_run(run_id)
        if run.state in TERMINAL:
            return run
        await self.ledger.request_cancel(run.id)
        self.request_cancel_local(run.id)
        driven_elsewhere = run.owner != self.owner and owner_is_alive(
            run.owner, run.owner_expires_at
        )
        if run.id in self._drives or driven_elsewhere:
            return await self.ledger.get_run(run.id)
        # Nobody drives it: drive it ourselves; the cancel flag makes that a prompt stop.
        return await self.drive(run.id)

    async def drive(self, run_id: str, *, claimed: Run | None = None) -> Run:
        """Take a run from wherever it is to its recorded outcome, or to a retry that is not
        due yet (the run is then ``pending``, unclaimed). Resumable after any crash.

        ``claimed`` is the run as this runner just claimed it (a worker's ``claim_due``), which
        spares reading and claiming it again."""
        if claimed is not None and claimed.id == run_id and claimed.owner == self.owner:
            run = claimed
        else:
            run = await self.ledger.get_run(run_id)
            if run.state in TERMINAL:
                return run
            if run.backend != self.backend:
                raise WrongBackend(run, self.backend)  # its machine ids mean nothing here
            if self._not_due(run):
                return run
            await self._claim(run)
        drive = _Drive(run.id)
        if run.cancel_requested:
            # A driver that died while cancelling may have stopped the machine already: without
            # this, its exit would be read as an ordinary failure instead of the cancel it was.
            drive.cancel.set()
        self._drives[run.id] = drive
        self._ensure_service()
        final: Run | None = None
        try:
            with anyio.CancelScope() as scope:
                drive.scope = scope
                final = await self._attempt_loop(drive, run)
        except BaseExceptionGroup as group:
            # Callers should see the API or ledger error itself, not "unhandled errors in a
            # TaskGroup" (the CLI turns a JobrunnerError into one clear line).
            raise sole_error(group) from None
        finally:
            self._drives.pop(run.id, None)
            if not drive.lost_claim and not drive.released:
                with anyio.CancelScope(shield=True):
                    await self.ledger.release_claim(run.id, self.owner)
        if final is None or not drive.released:
            final = await self.ledger.get_run(run.id)  # claim released since: read it afresh
        return final

    async def _logs_copied(self, run_id: str, attempt: int) -> None:
        await self.ledger.update_attempt(run_id, attempt, logs_copied_at=self.clock.now())

    async def recover_logs(self, *, limit: int = 32) -> int:
        """Copy the last log lines of finished attempts whose driver died between recording
        the outcome and the end of its log drain (the outcome comes first, so a SIGKILL there
        would otherwise lose them). Returns how many attempts it copied for."""
        now = self.clock.now()
        missing = await self.ledger.attempts_missing_logs(
            backend=self.backend,
            finished_before=now - timedelta(seconds=self._log_grace + 1.0),
            since=now - LOGS_KEPT,
            limit=limit,
        )
        followed: list[str] = []
        for attempt in missing:
            if attempt.machine_id is None or self.logs.following(attempt.machine_id):
                continue
            run = await self.ledger.get_run(attempt.run_id)
            try:
                masker = self._masker(Job.from_snapshot(run.job_snapshot))
            except JobSpecError:
                masker = SecretMasker(())
            self.logs.follow(
                app=self._app_of(run),
                machine_id=attempt.machine_id,
                run_id=run.id,
                attempt=attempt.number,
                since=attempt.created_at,
                masker=masker,
            )
            self.logs.machine_exited(attempt.machine_id)
            followed.append(attempt.machine_id)
        if followed:
            self._ensure_service()
            for machine_id in followed:
                await self.logs.drained(machine_id)
        return len(followed)

    async def logs_settled(self, run_id: str) -> None:
        """Return once the log lines of the machines this runner followed for ``run_id`` are
        all copied (the drain after each exit has ended)."""
        attempts = await self.ledger.get_attempts(run_id)
        for attempt in attempts:
            if attempt.machine_id is not None:
                await self.logs.drained(attempt.machine_id)

    async def wait(self, run_id: str, *, poll: float = 1.0) -> Run:
        """Wait for a run's outcome, driving it whenever nobody else does (after its driver
        died, or when its retry falls due)."""
        while True:
            run = await self.ledger.get_run(run_id)
            if run.state in TERMINAL:
                return run
            pause = poll
            if self._not_due(run):
                assert run.next_attempt_at is not None
                pause = min(poll, (run.next_attempt_at - self.clock.now()).total_seconds())
            elif run.owner == self.owner or not owner_is_alive(run.owner, run.owner_expires_at):
                try:
                    run = await self.drive(run.id)
                    if run.state in TERMINAL:
                        return run
                    continue  # requeued for a retry: loop to wait for it
                except RunBusy:
                    pass
            await self.clock.sleep(max(0.01, pause))

    def _not_due(self, run: Run) -> bool:
        return (
            run.state == "pending"
            and run.next_attempt_at is not None
            and run.next_attempt_at > self.clock.now()
        )

    async def reconcile(
        self, *, concurrency: int = RECONCILE_CONCURRENCY, batch: int = RECONCILE_BATCH
    ) -> ReconcileReport:
        """Finish every unfinished run of this backend that nobody drives.

        Orphans are claimed in batches and driven at most ``concurrency`` at a time. A run that
        cannot be finished now (an API outage, a bad record) is reported with its error and left
        for the next reconcile; it never stops the others.
        """
        report = ReconcileReport()
        seen: set[str] = set()
        limiter = anyio.Semaphore(max(1, concurrency))
        dead = await self.dead_owners()

        async def one(run: Run) -> None:
            async with limiter:
                try:
                    report.runs.append(await self.drive(run.id))
                    if run.id in self._unrunnable:
                        report.errors[run.id] = self._unrunnable.pop(run.id)
                except RunBusy:
                    logger.info("run %s was claimed by another process meanwhile", run.id)
                except Exception as exc:  # isolate: one bad run must not hold up the others
                    message = str(exc) or type(exc).__name__
                    report.errors[run.id] = message
                    self._emit("notice", run.id, f"could not finish run {run.id}: {message}")
                    with contextlib.suppress(Exception):
                        await self.ledger.release_claim(run.id, self.owner)
                        report.runs.append(await self.ledger.get_run(run.id))

        while True:
            claimed = await self.ledger.claim_orphans(
                self.owner, backend=self.backend, limit=batch, ttl_s=CLAIM_TTL, dead_owners=dead
            )
            fresh = [r for r in claimed if r.id not in seen]
            for run in claimed:
                if run.id in seen:  # tried in this pass already: leave it for the next one
                    await self.ledger.release_claim(run.id, self.owner)
            if not fresh:
                break
            seen.update(r.id for r in fresh)
            async with anyio.create_task_group() as tg:
                for run in fresh:
                    tg.start_soon(one, run)
        try:
            report.logs_recovered = await self.recover_logs(limit=batch)
        except JobrunnerError as exc:
            logger.warning("could not copy the logs of finished runs now: %s", exc)
        report.runs.sort(key=lambda r: r.created_at)
        return report

    async def dead_owners(self) -> set[str]:
        """Owners of unfinished runs that are processes on this host known to be dead."""
        owners = await self.ledger.claim_owners(self.backend)
        return {o for o in owners if o != self.owner and not owner_is_alive(o, None)}

    async def orphan_machines(self) -> list[Machine]:
        """Machines tagged by jobrunner that no unfinished run owns.

        A machine belongs to a live run when an attempt recorded its id, or when its
        ``jobrunner_run_id`` tag names an unfinished run: between the create and the commit of
        the machine id (or after a driver died right there) only the tag says whose it is.
        """
        machines = await self.client.list_machines(metadata={MANAGED_TAG: "true"})
        live = await self.ledger.machine_ids_of_live_runs()
        live_runs = {r.id for r in await self.ledger.list_unfinished_runs()}
        return [
            m
            for m in machines
            if m.id not in live
            and m.metadata_value("jobrunner_run_id") not in live_runs
            # A native schedule's machine is persistent by design (`schedules sync` owns it).
            and m.metadata_value("jobrunner_schedule") is None
            and m.state not in {"destroyed", "destroying", "replaced"}
        ]

    async def destroy_machine(self, machine_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self.client.delete_machine(machine_id, force=True)

    # ---- claiming ---------------------------------------------------------------------------

    async def _claim(self, run: Run) -> None:
        if await self.ledger.claim_run(run.id, self.owner, CLAIM_TTL):
            return
        current = await self.ledger.get_run(run.id)
        if owner_is_alive(current.owner, current.owner_expires_at):
            raise RunBusy(run.id, current.owner or "?")
        taken = await self.ledger.takeover_claim(run.id, current.owner, self.owner, CLAIM_TTL)
        if not taken:
            raise RunBusy(run.id, current.owner or "?")
        self._emit("notice", run.id, f"took over run from dead driver {current.owner}")

    # ---- the attempt loop -------------------------------------------------------------------

    async def _attempt_loop(self, drive: _Drive, first: Run) -> Run | None:
        """Drive one attempt (or finish a run whose last attempt decided it); the run as it is
        then (finished, or requeued for a retry and released), or None if left as it was."""
        run: Run | None = first
        while True:
            if run is None:
                run = await self.ledger.get_run(drive.run_id)
            if run.state in TERMINAL or drive.lost_claim or self._not_due(run):
                return None
            try:
                job = Job.from_snapshot(run.job_snapshot)
            except JobSpecError as exc:
                # A recorded job that can never become a machine (a ledger written by another
                # version, or text no API can carry): trying again would fail the same way, so
                # it ends now with its own reason instead of holding up every reconcile.
                reason = f"the recorded job cannot be run: {exc}"
                await self._finish(run, "create_failed", reason=reason)
                self._unrunnable[run.id] = reason
                self._emit("notice", run.id, f"run {run.id} ended create_failed: {reason}")
                run = None
                continue
            attempt, fresh = await self._next_attempt(drive, run, job)
            if attempt is None:
                run = None
                continue  # the run was finished (cancelled or out of retries): read it again
            result = await self._drive_attempt(drive, run, job, attempt, fresh=fresh)
            final = await self._record_attempt(run, job, attempt, result)
            drive.released = True
            return final

    async def _next_attempt(self, drive: _Drive, run: Run, job: Job) -> tuple[Attempt | None, bool]:
        """The attempt to work on: the unfinished latest one, or a new one if a retry is due.

        The flag says whether this process just created the attempt row: only an attempt
        inherited from an earlier driver can already have a machine we do not know about.
        """
        # A run never attempted needs no look: it has no attempt to resume.
        latest = await self.ledger.latest_attempt(run.id) if run.attempts else None
        if latest is not None and latest.outcome is None:
            return latest, False
        # A final attempt decides the run (a cancelled attempt is final, with its own reason);
        # only then does a pending cancel stop a retry from starting.
        if latest is not None and not self._should_retry(job, run, latest):
            outcome, reason = self._final_outcome(job, run, latest)
            await self._finish(run, outcome, exit_code=latest.exit_code, reason=reason)
            return None, False
        if run.cancel_requested or drive.cancel.is_set():
            await self._finish(run, "cancelled", reason="cancelled before the next attempt started")
            return None, False
        number = 1 if latest is None else latest.number + 1
        attempt = await self.ledger.begin_attempt(
            run.id, number, submit_id=f"{run.id}.{number}", region=job.region
        )
        self._emit("attempt", run.id, f"attempt {number} of {run.max_attempts}", attempt=number)
        self._emit("state", run.id, "creating machine", state="creating", attempt=number)
        return attempt, True

    def _final_outcome(self, job: Job, run: Run, latest: Attempt) -> tuple[str, str | None]:
        """The run's terminal state after its last attempt: that attempt's outcome, or ``dead``
        for a queued run whose failure would have been retried had it attempts left."""
        outcome = latest.outcome or "lost"
        retryable = job.retries.should_retry(self._retry_outcome(latest), latest.exit_code)
        if run.queue is not None and outcome not in {"succeeded", "cancelled"} and retryable:
            why = latest.reason or outcome
            return "dead", f"all {run.max_attempts} attempt(s) used; the last {outcome}: {why}"
        return outcome, latest.reason

    @staticmethod
    def _retry_outcome(latest: Attempt) -> str:
        outcome = latest.outcome or "lost"
        if outcome == "create_failed" and (latest.reason or "").startswith("capacity:"):
            return "capacity"
        return outcome

    def _should_retry(self, job: Job, run: Run, latest: Attempt) -> bool:
        if latest.number >= run.max_attempts:
            return False
        if latest.outcome in {"succeeded", "cancelled"}:
            return False
        return job.retries.should_retry(self._retry_outcome(latest), latest.exit_code)

    async def _record_attempt(
        self, run: Run, job: Job, attempt: Attempt, result: AttemptResult
    ) -> Run:
        """Record how the attempt ended and what follows (the run's outcome, or a requeue for
        the next attempt), letting go of the claim, in one ledger transaction."""
        now = self.clock.now()
        # API errors and exit details can quote the machine's config or output.
        reason = self._masker(job).mask(result.reason) if result.reason else None
        ended = replace(attempt, outcome=result.outcome, exit_code=result.exit_code, reason=reason)
        fields: dict[str, Any] = {
            "state": "finished",
            "outcome": result.outcome,
            "exit_code": result.exit_code,
            "oom_killed": result.oom_killed,
            "signal": result.signal,
            "requested_stop": result.requested_stop,
            "reason": reason,
            "finished_at": now,
        }
        if self._should_retry(job, run, ended):
            delay = job.retries.delay_for(attempt.number + 1)
            why = f"exit code {result.exit_code}" if result.outcome == "failed" else result.outcome
            requeue_reason = (
                f"attempt {attempt.number} {result.outcome} ({why}); "
                f"attempt {attempt.number + 1} of {run.max_attempts} in {delay:.0f}s"
            )
            final = await self.ledger.end_attempt(
                run.id,
                attempt.number,
                owner=self.owner,
                requeue_at=now + timedelta(seconds=delay),
                requeue_reason=requeue_reason,
                attempt_fields=fields,
            )
            self._emit("retry", run.id, requeue_reason, attempt=attempt.number)
            return final
        outcome, run_reason = self._final_outcome(job, run, ended)
        final = await self.ledger.end_attempt(
            run.id,
            attempt.number,
            owner=self.owner,
            outcome=outcome,
            exit_code=result.exit_code,
            reason=run_reason,
            attempt_fields=fields,
        )
        if final.state == outcome:
            self._emit("state", run.id, run_reason or outcome, state=outcome)
        return final

    async def _finish(
        self, run: Run, outcome: str, *, exit_code: int | None = None, reason: str | None = None
    ) -> None:
        if await self.ledger.finish_run(run.id, outcome, exit_code=exit_code, reason=reason):
            self._emit("state", run.id, reason or outcome, state=outcome)

    # ---- one attempt ------------------------------------------------------------------------

    async def _drive_attempt(
        self, drive: _Drive, run: Run, job: Job, attempt: Attempt, *, fresh: bool
    ) -> AttemptResult:
        machine_id = attempt.machine_id
        if machine_id is None:
            found = None if fresh else await self._find_machine(attempt.submit_id, run)
            if found is None and drive.cancel.is_set():
                return AttemptResult("cancelled", reason="cancelled before its machine was created")
            if found is None:
                created = await self._create(run, job, attempt)
                if isinstance(created, AttemptResult):
                    return created
                found = created
                del created
            machine_id = found.id
            made = f"machine {found.id} created in {found.region}"
            attempt = await self.ledger.advance_attempt(
                run.id,
                attempt.number,
                to_state="starting",
                reason=made,
                state="starting",
                machine_id=found.id,
                instance_id=found.instance_id,
                region=found.region,
            )
            self._emit("state", run.id, made, state="starting", attempt=attempt.number)
            # The API answers with the whole config (the files' base64 with it): not kept for
            # the rest of the run.
            del found
        drive.machines.append(machine_id)
        self.logs.follow(
            app=self._app_of(run),
            machine_id=machine_id,
            run_id=run.id,
            attempt=attempt.number,
            since=attempt.created_at,
            masker=self._masker(job),
        )
        try:
            return await self._watch(drive, run, job, attempt, machine_id)
        finally:
            # The outcome is recorded now; the lines still in flight are copied afterwards,
            # without holding the run's claim or the caller's slot.
            self.logs.machine_exited(machine_id)

    def _app_of(self, run: Run) -> str:
        return run.app or self.app

    async def _find_machine(self, submit_id: str, run: Run) -> Machine | None:
        """The machine an earlier driver may have created for this attempt before dying."""
        machines = await self.client.list_machines(
            include_deleted=True,
            metadata={"jobrunner_submit_id": submit_id},
            app=self._app_of(run),
        )
        # The metadata filter is documented only in prose: adopt only a machine that really
        # carries the submit id, or a filter the server ignored would hand us a stranger's machine.
        ours = [m for m in machines if submit_id_of(m) == submit_id]
        return min(ours, key=lambda m: m.created_at or "") if ours else None

    async def _create(self, run: Run, job: Job, attempt: Attempt) -> Machine | AttemptResult:
        try:
            # Large files are recorded by digest: their bytes come from the ledger's blob store,
            # once per attempt, and only the config's base64 of them is kept while it is sent.
            blobs = {digest: await self.ledger.get_blob(digest) for digest in job.blob_digests()}
        except BlobNotFound as exc:
            return AttemptResult("create_failed", reason=f"a file of the job is missing: {exc}")
        try:
            config = job.to_machine_config(
                environ=self.environ, metadata=machine_metadata(run, attempt, job), blobs=blobs
            )
        except JobSpecError as exc:
            return AttemptResult("create_failed", reason=str(exc))
        finally:
            del blobs
        regions: list[str | None] = [job.region, *job.fallback_regions]
        last: InsufficientCapacity | None = None
        for region in regions:
            try:
                return await self.client.create_machine(
                    config, region=region, app=self._app_of(run)
                )
            except InsufficientCapacity as exc:
                last = exc
                self._emit("notice", run.id, f"no capacity in {region or 'default region'}: {exc}")
            except MachinesAPIError as exc:
                if is_ambiguous(exc):
                    # A 5xx/408 may hide a create that took effect; the client looked already,
                    # but the list is eventually consistent: look once more before recording a
                    # failure while a machine may be running the job.
                    found = await self._find_machine(attempt.submit_id, run)
                    if found is not None:
                        return found
                if is_transient(exc):
                    # 429, 502, 503, 504 after the client's retries: the API is busy or down,
                    # the job is fine. The run stays as it was (like a refused connection), for
                    # the next driver (a worker's next claim, `wait`, `runs reconcile`) to create
                    # its machine, with the same submit id, so never twice.
                    raise
                return AttemptResult("create_failed", reason=str(exc))
            except (UnicodeError, ValueError) as exc:
                # A config the API cannot even be sent (e.g. text that is not valid UTF-8).
                return AttemptResult("create_failed", reason=f"invalid machine config: {exc}")
        return AttemptResult("create_failed", reason=f"capacity: {last}", capacity=True)

    async def _watch(
        self, drive: _Drive, run: Run, job: Job, attempt: Attempt, machine_id: str
    ) -> AttemptResult:
        """Wait for the machine's exit; enforce the timeout and pass on a cancel."""
        app = self._app_of(run)
        forced: str | None = None
        machine: Machine | None = None
        if drive.cancel.is_set():
            forced = "cancelled"
        else:
            async with anyio.create_task_group() as tg:

                async def watch_cancel() -> None:
                    nonlocal forced
                    await drive.cancel.wait()
                    forced = "cancelled"
                    tg.cancel_scope.cancel()

                async def watch_exit() -> None:
                    nonlocal forced, machine
                    forced, machine = await self._wait_exit(run, job, attempt, machine_id)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_cancel)
                tg.start_soon(watch_exit)
        if forced is not None:
            await self._stop_and_destroy(job, machine_id, app)
            machine = None
        if machine is None:
            machine = await self._get_machine(machine_id, app)
        result = read_outcome(machine_id, machine, forced, timeout=job.timeout)
        await self._note_start(run, attempt, machine)
        return result

    async def _wait_exit(
        self, run: Run, job: Job, attempt: Attempt, machine_id: str
    ) -> tuple[str | None, Machine | None]:
        """Block until the machine exits: ``(None, machine or None)``; or until the job's
        deadline, counted from the machine's own start event, passes: ``("timed_out", None)``.

        Judging the deadline by what the machine did, not by when a driver wrote a row, is what
        makes a driver that comes back late record the truth: a job that exited by itself before
        its deadline is never called timed out, and a machine created by a late driver gets its
        whole timeout."""
        app = self._app_of(run)
        started_at = attempt.started_at
        poll = self._first_wait
        if job.timeout is not None:
            # Before the start event is read, the deadline is at least this far away.
            poll = min(poll, job.timeout)
        while True:
            if job.timeout is not None and started_at is not None:
                left = (
                    started_at + timedelta(seconds=job.timeout) - self.clock.now()
                ).total_seconds()
                poll = min(poll, max(0.0, left))
            try:
                # The API's wait takes whole seconds; a deadline closer than that is kept by
                # cancelling the poll, so a timeout is enforced on time, not up to 1 s late.
                with anyio.move_on_after(poll):
                    await self.client.wait(
                        machine_id,
                        ["stopped", "destroyed"],
                        instance_id=attempt.instance_id,
                        timeout=max(poll, 1.0),
                        app=app,
                    )
                    return None, None
            except (NotFound, MachineDestroyed):
                return None, None  # gone: the exit event (or its absence) decides
            except WaitTimeout:
                pass
            machine = await self._get_machine(machine_id, app)
            if machine is None or machine.state in {"stopped", "destroyed", "destroying", "failed"}:
                return None, machine
            start = machine.last_start()
            if start is not None and started_at is None:
                started_at = _event_time(start.timestamp)
                attempt = await self._note_start(run, attempt, machine)
            elif start is None:
                # Pulling a large image can take minutes on Fly: say that it is still going.
                self._emit(
                    "notice",
                    run.id,
                    f"machine {machine_id} is still starting ({machine.state})",
                    attempt=attempt.number,
                )
            if (
                job.timeout is not None
                and started_at is not None
                and self.clock.now() >= started_at + timedelta(seconds=job.timeout)
            ):
                return "timed_out", None
            poll = LONG_WAIT

    async def _note_start(self, run: Run, attempt: Attempt, machine: Machine | None) -> Attempt:
        """Record the attempt's start (from the machine's start event) once, and move the run to
        ``running``; for a run whose exit came first, the history still shows the start."""
        if attempt.started_at is not None or machine is None:
            return attempt
        start = machine.last_start()
        if start is None:
            return attempt
        when = _event_time(start.timestamp)
        started = f"machine {machine.id} started"
        attempt = await self.ledger.advance_attempt(
            run.id,
            attempt.number,
            to_state="running",
            reason=started,
            from_states={"pending", "creating", "starting"},
            run_fields={"started_at": when},
            state="running",
            started_at=when,
        )
        self._emit("state", run.id, started, state="running", attempt=attempt.number)
        return attempt

    async def _get_machine(self, machine_id: str, app: str) -> Machine | None:
        try:
            return await self.client.get_machine(machine_id, app=app)
        except NotFound:
            return None

    async def _stop_and_destroy(self, job: Job, machine_id: str, app: str) -> None:
        """Stop gracefully (the job's stop signal and grace), then destroy. Never raises for 404."""
        with anyio.CancelScope(shield=True):
            try:
                await self.client.stop_machine(
                    machine_id, signal=job.stop_signal, timeout=job.stop_timeout, app=app
                )
                with anyio.move_on_after(job.stop_timeout + 5):
                    await self.client.wait(machine_id, ["stopped", "destroyed"], app=app)
            except (NotFound, Conflict, WaitTimeout, MachineDestroyed):
                pass
            except MachinesAPIError as exc:
                logger.warning("stopping machine %s failed: %s", machine_id, exc)
            try:
                await self.client.delete_machine(machine_id, force=True, app=app)
            except (NotFound, Conflict):
                pass
            except MachinesAPIError as exc:
                logger.warning("destroying machine %s failed: %s", machine_id, exc)

    def _masker(self, job: Job) -> SecretMasker:
        """Masks the values of ``job``'s secrets (as this process sees them) in text we store."""
        return SecretMasker(self.environ.get(name, "") for name in job.secrets)


def sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside (nested) task-group exception groups, or the group itself."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        current = pending.pop()
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        else:
            leaves.append(current)
    return leaves[0] if len(leaves) == 1 else group
