"""A run's life: submit, create the machine, wait by instance_id, record the outcome, retry, cancel.

There is one path from "a run row exists" to "its outcome is recorded": ``Runner.drive``. The
CLI's ``run``, a detached run, ``wait``, ``runs reconcile`` and (later) the worker all call it, so
a run left half-done by a crashed process is finished by whoever drives it next, from the store
plus the API.

Crash safety rests on three rules:
1. the run row and each attempt row are committed before the API call that depends on them;
2. every machine is created with a deterministic ``jobrunner_submit_id`` tag
   (``<run id>.<attempt>``), so a process that resumes an attempt whose create may or may not
   have happened finds the machine by listing ``metadata.jobrunner_submit_id=...`` first;
3. ``Store.finish_run`` is a conditional update, so an outcome is recorded exactly once even when
   two processes race.

A run is driven by one process at a time: it holds a claim in the store (owner + expiry), renewed
by a side task. A claim whose owner is a dead process on this host, or whose expiry passed, is
taken over (jobrunner.claims). A run is only driven through the backend it was submitted to.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.to_thread

from jobrunner.claims import CLAIM_TTL, RunBusy, new_owner_id, owner_is_alive
from jobrunner.errors import JobrunnerError
from jobrunner.events import EventHandler, RunEvent, ignore_events
from jobrunner.logsync import LogCopier, SecretMasker
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
from jobrunner.outcomes import TERMINAL, AttemptResult, read_outcome
from jobrunner.spec import Job, JobSpecError
from jobrunner.store import Attempt, Run, Store

logger = logging.getLogger(__name__)

# Re-exported: the CLI and callers import these from here.
__all__ = [
    "TERMINAL",
    "AttemptResult",
    "RunBusy",
    "Runner",
    "WrongBackend",
    "owner_is_alive",
    "sole_error",
]

P = ParamSpec("P")
T = TypeVar("T")

SUPERVISE_EVERY = 1.0
NO_DEADLINE = 10 * 365 * 86400.0
MANAGED_TAG = "jobrunner_managed"


class WrongBackend(JobrunnerError):
    """The run was submitted to another backend than the one this runner talks to."""

    def __init__(self, run: Run, backend: str) -> None:
        super().__init__(
            f"run {run.id} runs on the {run.backend} backend, not {backend}; "
            f"use --backend {run.backend} (or JOBRUNNER_BACKEND={run.backend}) for it"
        )


@dataclass
class _Drive:
    """Per-run state shared by the attempt loop and its side task."""

    run_id: str
    cancel: anyio.Event = field(default_factory=anyio.Event)
    lost_claim: bool = False


def machine_metadata(run: Run, attempt: Attempt, job: Job) -> dict[str, str]:
    return {
        MANAGED_TAG: "true",
        "jobrunner_run_id": run.id,
        "jobrunner_attempt": str(attempt.number),
        "jobrunner_job": job.name,
        "jobrunner_submit_id": attempt.submit_id,
    }


class Runner:
    """Drives runs of jobs on one Machines API (Fly or the local backend) into a store."""

    def __init__(
        self,
        client: AsyncMachinesClient,
        store: Store,
        *,
        backend: str,
        app: str,
        environ: Mapping[str, str] | None = None,
        on_event: EventHandler = ignore_events,
        log_poll_interval: float = 0.5,
        log_drain_grace: float = 1.0,
        start_poll: float = 5.0,
    ) -> None:
        self.client = client
        self.store = store
        self.backend = backend
        self.app = app
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self.on_event = on_event
        self.owner = new_owner_id()
        self._log_poll = log_poll_interval
        self._log_grace = log_drain_grace
        self._start_poll = start_poll
        self._drives: dict[str, _Drive] = {}

    def _app_of(self, run: Run) -> str:
        return run.app or self.app

    async def _db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a (blocking) store call off the event loop."""
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs))

    def _emit(self, kind: Any, run_id: str, message: str = "", **extra: Any) -> None:
        self.on_event(RunEvent(kind=kind, run_id=run_id, message=message, **extra))

    # ---- public API -------------------------------------------------------------------------

    async def submit(self, job: Job, *, trigger: str = "python") -> Run:
        """Record a new run of ``job`` (state ``pending``); nothing is created on the API yet.

        The job's secrets are checked now, so a run that cannot start is refused before it exists.
        """
        job.to_machine_config(environ=self.environ, metadata={})  # raises JobSpecError early
        run = await self._db(
            self.store.create_run,
            job_name=job.name,
            job_snapshot=job.snapshot(),
            backend=self.backend,
            app=job.app or self.app,
            region=job.region,
            max_attempts=job.retries.max_attempts,
            timeout_s=job.timeout,
            trigger=trigger,
        )
        self._emit("state", run.id, "submitted", state="pending")
        return run

    async def run(self, job: Job, *, trigger: str = "python") -> Run:
        """Submit ``job`` and drive it to its outcome."""
        run = await self.submit(job, trigger=trigger)
        return await self.drive(run.id)

    def request_cancel_local(self, run_id: str) -> None:
        """Ask a run this process is driving to stop (used by the CLI's Ctrl-C)."""
        drive = self._drives.get(run_id)
        if drive is not None:
            drive.cancel.set()

    async def cancel(self, run_id: str) -> Run:
        """Cancel a run: flag it in the store; if nobody is driving it, stop its machine here."""
        run = await self._db(self.store.get_run, run_id)
        if run.state in TERMINAL:
            return run
        await self._db(self.store.request_cancel, run.id)
        self.request_cancel_local(run.id)
        if run.id in self._drives or owner_is_alive(run.owner, run.owner_expires_at):
            return await self._db(self.store.get_run, run.id)
        # Nobody drives it: drive it ourselves; the cancel flag makes that a prompt stop.
        return await self.drive(run.id)

    async def drive(self, run_id: str) -> Run:
        """Take a run from wherever it is to its recorded outcome. Resumable after any crash."""
        run = await self._db(self.store.get_run, run_id)
        if run.state in TERMINAL:
            return run
        if run.backend != self.backend:
            raise WrongBackend(run, self.backend)  # its machine ids mean nothing here
        await self._claim(run)
        drive = _Drive(run.id)
        if run.cancel_requested:
            # A driver that died while cancelling may have stopped the machine already: without
            # this, its exit would be read as an ordinary failure instead of the cancel it was.
            drive.cancel.set()
        self._drives[run.id] = drive
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._supervise, drive)
                await self._attempt_loop(drive)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Callers should see the API or ledger error itself, not "unhandled errors in a
            # TaskGroup" (the CLI turns a JobrunnerError into one clear line).
            raise sole_error(group) from None
        finally:
            self._drives.pop(run.id, None)
            with anyio.CancelScope(shield=True):
                await self._db(self.store.release_claim, run.id, self.owner)
        return await self._db(self.store.get_run, run.id)

    async def wait(self, run_id: str, *, poll: float = 1.0) -> Run:
        """Wait for a run's outcome; resume driving it if its driver has died."""
        while True:
            run = await self._db(self.store.get_run, run_id)
            if run.state in TERMINAL:
                return run
            if not owner_is_alive(run.owner, run.owner_expires_at):
                try:
                    return await self.drive(run.id)
                except RunBusy:
                    pass
            await anyio.sleep(poll)

    async def reconcile(self) -> list[Run]:
        """Resume every unfinished run nobody drives, concurrently; return their final rows."""
        runs = await self._db(self.store.list_unfinished_runs)
        orphaned = [
            r
            for r in runs
            if r.backend == self.backend and not owner_is_alive(r.owner, r.owner_expires_at)
        ]
        results: list[Run] = []

        async def one(run: Run) -> None:
            try:
                results.append(await self.drive(run.id))
            except RunBusy:
                logger.info("run %s was claimed by another process meanwhile", run.id)
            except JobrunnerError as exc:
                # One run the API or ledger cannot finish now must not stop the others; it stays
                # unfinished (and is returned as such) for the next reconcile.
                self._emit("notice", run.id, f"could not finish run {run.id}: {exc}")
                with contextlib.suppress(JobrunnerError):
                    results.append(await self._db(self.store.get_run, run.id))

        async with anyio.create_task_group() as tg:
            for run in orphaned:
                tg.start_soon(one, run)
        return sorted(results, key=lambda r: r.created_at)

    async def orphan_machines(self) -> list[Machine]:
        """Machines tagged by jobrunner that no unfinished run owns.

        A machine belongs to a live run when an attempt recorded its id, or when its
        ``jobrunner_run_id`` tag names an unfinished run: between the create and the commit of
        the machine id (or after a driver died right there) only the tag says whose it is.
        """
        machines = await self.client.list_machines(metadata={MANAGED_TAG: "true"})
        live = await self._db(self.store.machine_ids_of_live_runs)
        live_runs = {r.id for r in await self._db(self.store.list_unfinished_runs)}
        return [
            m
            for m in machines
            if m.id not in live
            and m.metadata_value("jobrunner_run_id") not in live_runs
            and m.state not in {"destroyed", "destroying", "replaced"}
        ]

    async def destroy_machine(self, machine_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self.client.delete_machine(machine_id, force=True)

    # ---- claiming ---------------------------------------------------------------------------

    async def _claim(self, run: Run) -> None:
        if await self._db(self.store.claim_run, run.id, self.owner, CLAIM_TTL):
            return
        current = await self._db(self.store.get_run, run.id)
        if owner_is_alive(current.owner, current.owner_expires_at):
            raise RunBusy(run.id, current.owner or "?")
        taken = await self._db(
            self.store.takeover_claim, run.id, current.owner, self.owner, CLAIM_TTL
        )
        if not taken:
            raise RunBusy(run.id, current.owner or "?")
        self._emit("notice", run.id, f"took over run from dead driver {current.owner}")

    async def _supervise(self, drive: _Drive) -> None:
        """Renew the claim and notice cancel requests made by other processes."""
        last_renew = time.monotonic()
        while True:
            await anyio.sleep(SUPERVISE_EVERY)
            run = await self._db(self.store.get_run, drive.run_id)
            if run.cancel_requested:
                drive.cancel.set()
            if time.monotonic() - last_renew >= CLAIM_TTL / 3:
                ok = await self._db(self.store.renew_claim, drive.run_id, self.owner, CLAIM_TTL)
                last_renew = time.monotonic()
                if not ok:
                    drive.lost_claim = True
                    logger.warning("lost the claim on run %s", drive.run_id)

    # ---- the attempt loop -------------------------------------------------------------------

    async def _attempt_loop(self, drive: _Drive) -> None:
        while True:
            run = await self._db(self.store.get_run, drive.run_id)
            if run.state in TERMINAL or drive.lost_claim:
                return
            job = Job.from_snapshot(run.job_snapshot)
            attempt, fresh = await self._next_attempt(drive, run, job)
            if attempt is None:
                continue  # the run was finished (cancelled or out of retries)
            result = await self._drive_attempt(drive, run, job, attempt, fresh=fresh)
            await self._record_attempt(run, job, attempt, result)

    async def _next_attempt(self, drive: _Drive, run: Run, job: Job) -> tuple[Attempt | None, bool]:
        """The attempt to work on: the unfinished latest one, or a new one if a retry is due.

        The flag says whether this process just created the attempt row: only an attempt
        inherited from an earlier driver can already have a machine we do not know about.
        """
        latest = await self._db(self.store.latest_attempt, run.id)
        if latest is not None and latest.outcome is None:
            return latest, False
        # A final attempt decides the run (a cancelled attempt is final, with its own reason);
        # only then does a pending cancel stop a retry from starting.
        if latest is not None and not self._should_retry(job, run, latest):
            await self._finish(
                run, latest.outcome or "lost", exit_code=latest.exit_code, reason=latest.reason
            )
            return None, False
        if run.cancel_requested or drive.cancel.is_set():
            await self._finish(run, "cancelled", reason="cancelled before the next attempt started")
            return None, False
        if latest is not None and await self._sleep_until_due(drive, run):
            await self._finish(run, "cancelled", reason="cancelled while waiting to retry")
            return None, False
        number = 1 if latest is None else latest.number + 1
        attempt = await self._db(
            self.store.create_attempt,
            run.id,
            number,
            submit_id=f"{run.id}.{number}",
            region=job.region,
        )
        self._emit("attempt", run.id, f"attempt {number} of {run.max_attempts}", attempt=number)
        return attempt, True

    def _should_retry(self, job: Job, run: Run, latest: Attempt) -> bool:
        if latest.number >= run.max_attempts:
            return False
        if latest.outcome in {"succeeded", "cancelled"}:
            return False
        outcome = latest.outcome or "lost"
        if outcome == "create_failed" and (latest.reason or "").startswith("capacity:"):
            outcome = "capacity"
        return job.retries.should_retry(outcome, latest.exit_code)

    async def _sleep_until_due(self, drive: _Drive, run: Run) -> bool:
        """Sleep until ``next_attempt_at``; True if cancelled meanwhile."""
        if run.next_attempt_at is None:
            return False
        delay = (run.next_attempt_at - datetime.now(UTC)).total_seconds()
        if delay <= 0:
            return False
        with anyio.move_on_after(delay):
            await drive.cancel.wait()
            return True
        return False

    async def _record_attempt(
        self, run: Run, job: Job, attempt: Attempt, result: AttemptResult
    ) -> None:
        finished = await self._db(
            self.store.update_attempt,
            run.id,
            attempt.number,
            state="finished",
            outcome=result.outcome,
            exit_code=result.exit_code,
            oom_killed=result.oom_killed,
            signal=result.signal,
            requested_stop=result.requested_stop,
            # API errors and exit details can quote the machine's config or output.
            reason=self._masker(job).mask(result.reason) if result.reason else None,
            finished_at=datetime.now(UTC),
        )
        if self._should_retry(job, run, finished):
            delay = job.retries.delay_for(attempt.number + 1)
            reason = f"attempt {attempt.number} {result.outcome}; retrying in {delay:.0f}s"
            await self._db(
                self.store.transition_run,
                run.id,
                "pending",
                reason=reason,
                attempt_number=attempt.number,
                next_attempt_at=datetime.fromtimestamp(time.time() + delay, UTC),
            )
            self._emit("retry", run.id, reason, attempt=attempt.number)

    async def _finish(
        self, run: Run, outcome: str, *, exit_code: int | None = None, reason: str | None = None
    ) -> None:
        if await self._db(
            self.store.finish_run, run.id, outcome, exit_code=exit_code, reason=reason
        ):
            self._emit("state", run.id, reason or outcome, state=outcome)

    async def _transition(self, run: Run, state: str, attempt: int, reason: str) -> None:
        await self._db(
            self.store.transition_run, run.id, state, reason=reason, attempt_number=attempt
        )
        self._emit("state", run.id, reason, state=state, attempt=attempt)

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
            machine_id = found.id
            attempt = await self._db(
                self.store.update_attempt,
                run.id,
                attempt.number,
                state="starting",
                machine_id=found.id,
                instance_id=found.instance_id,
                region=found.region,
            )
            await self._transition(
                run, "starting", attempt.number, f"machine {found.id} created in {found.region}"
            )
        return await self._watch(drive, run, job, attempt, machine_id)

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
        await self._transition(run, "creating", attempt.number, "creating machine")
        try:
            config = job.to_machine_config(
                environ=self.environ, metadata=machine_metadata(run, attempt, job)
            )
        except JobSpecError as exc:
            return AttemptResult("create_failed", reason=str(exc))
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
                return AttemptResult("create_failed", reason=str(exc))
        return AttemptResult("create_failed", reason=f"capacity: {last}", capacity=True)

    async def _watch(
        self, drive: _Drive, run: Run, job: Job, attempt: Attempt, machine_id: str
    ) -> AttemptResult:
        """Wait for the machine to start and exit, copying logs; enforce timeout and cancel."""
        copier = LogCopier(
            self.client,
            self.store,
            run_id=run.id,
            attempt=attempt.number,
            machine_id=machine_id,
            on_event=self.on_event,
            poll_interval=self._log_poll,
            drain_grace=self._log_grace,
            to_thread=self._db,
            app=self._app_of(run),
            since=attempt.created_at,
            masker=self._masker(job),
        )
        forced: str | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(copier.run)
            forced = await self._wait_exit(drive, run, job, attempt, machine_id)
            if forced is not None:
                await self._stop_and_destroy(job, machine_id, self._app_of(run))
            copier.machine_exited()
        return await self._outcome(machine_id, self._app_of(run), forced)

    def _deadline(self, job: Job, attempt: Attempt) -> float:
        """Seconds left before the attempt's timeout (from its start, or its creation)."""
        if job.timeout is None:
            return NO_DEADLINE
        since = attempt.started_at or attempt.created_at
        elapsed = (datetime.now(UTC) - since).total_seconds()
        return job.timeout - elapsed

    async def _wait_exit(
        self, drive: _Drive, run: Run, job: Job, attempt: Attempt, machine_id: str
    ) -> str | None:
        """Block until the machine exits (None), the deadline passes or a cancel arrives."""
        if drive.cancel.is_set():
            return "cancelled"
        result: str | None = "timed_out"
        with anyio.move_on_after(max(0.0, self._deadline(job, attempt))):
            async with anyio.create_task_group() as tg:

                async def watch_cancel() -> None:
                    nonlocal result
                    await drive.cancel.wait()
                    result = "cancelled"
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_cancel)
                if attempt.started_at is None:
                    await self._wait_started(run, attempt, machine_id)
                await self._wait_stopped(attempt, machine_id, self._app_of(run))
                result = None
                tg.cancel_scope.cancel()
        return result

    async def _wait_started(self, run: Run, attempt: Attempt, machine_id: str) -> None:
        began = time.monotonic()
        while True:
            try:
                await self.client.wait(
                    machine_id,
                    "started",
                    instance_id=attempt.instance_id,
                    timeout=self._start_poll,
                    app=self._app_of(run),
                )
                break
            except MachineDestroyed:
                return  # it already ran to completion
            except NotFound:
                return  # gone: _outcome decides between an exit event and "lost"
            except WaitTimeout:
                try:
                    machine = await self.client.get_machine(machine_id, app=self._app_of(run))
                except NotFound:
                    return
                if machine.state in {"stopped", "destroyed", "destroying", "failed"}:
                    return
                # Pulling a large image can take minutes on Fly: say that it is still going.
                waited = time.monotonic() - began
                self._emit(
                    "notice",
                    run.id,
                    f"machine {machine_id} is still starting ({machine.state}, {waited:.0f}s)",
                    attempt=attempt.number,
                )
        await self._db(
            self.store.update_attempt,
            run.id,
            attempt.number,
            state="running",
            started_at=datetime.now(UTC),
        )
        await self._transition(run, "running", attempt.number, f"machine {machine_id} started")

    async def _wait_stopped(self, attempt: Attempt, machine_id: str, app: str) -> None:
        try:
            await self.client.wait(
                machine_id,
                ["stopped", "destroyed"],
                instance_id=attempt.instance_id,
                timeout=NO_DEADLINE,
                app=app,
            )
        except NotFound:
            return  # gone: _outcome decides between an exit event and "lost"

    async def _stop_and_destroy(self, job: Job, machine_id: str, app: str) -> None:
        """Stop gracefully (the job's stop signal and grace), then destroy. Never raises for 404."""
        with anyio.CancelScope(shield=True):
            try:
                await self.client.stop_machine(
                    machine_id, signal=job.stop_signal, timeout=job.stop_timeout, app=app
                )
                with anyio.move_on_after(job.stop_timeout + 5):
                    await self.client.wait(machine_id, ["stopped", "destroyed"], app=app)
            except (NotFound, Conflict, WaitTimeout):
                pass
            except MachinesAPIError as exc:
                logger.warning("stopping machine %s failed: %s", machine_id, exc)
            try:
                await self.client.delete_machine(machine_id, force=True, app=app)
            except (NotFound, Conflict):
                pass
            except MachinesAPIError as exc:
                logger.warning("destroying machine %s failed: %s", machine_id, exc)

    async def _outcome(self, machine_id: str, app: str, forced: str | None) -> AttemptResult:
        try:
            machine: Machine | None = await self.client.get_machine(machine_id, app=app)
        except NotFound:
            machine = None
        return read_outcome(machine_id, machine, forced)

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
