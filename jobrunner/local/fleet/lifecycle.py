"""A machine's process lifecycle: boot, exit, restart policy, stop, destroy, recovery, shutdown.

One task per boot ("run") owns the process from launch to exit and is the only place an exit is
turned into events and a next state (fly-machines-api.md section 4). Whoever wants the process
gone (stop, restart, update, destroy, server shutdown) records an *intent* and asks the handle to
stop; the run task then reads the intent to decide what follows the exit:

    exit on its own  -> restart policy: boot again (restarting) or stopped [-> destroyed]
    "stop"           -> stopped [-> destroyed when auto_destroy]
    "restart"        -> boot again
    "replace"        -> nothing: the update that asked carries on with the new config
    "destroy"        -> destroyed
    "shutdown"       -> stopped [-> destroyed], with an error saying the server shut down
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from jobrunner.local.api.validate import parse_duration, parse_signal, restart_policy
from jobrunner.local.fleet.records import MachineRecord, rfc3339_ms
from jobrunner.local.fleet.registry import Registry, Runtime
from jobrunner.local.fleet.runspec import LaunchProblem, build_spec
from jobrunner.local.process.shim_client import LiveRun, ShimClient
from jobrunner.local.process.supervisor import (
    MachineProcess,
    ProcessExit,
    ProcessHandle,
    ProcessSpec,
    kill_orphan_group,
    launch,
    pid_alive,
)
from jobrunner.local.state.logstore import LogStore

__all__ = ["LAUNCH_FAILED_EXIT_CODE", "RECOVERY_ERROR", "RECOVERY_EXIT_CODE", "Lifecycle"]

logger = logging.getLogger("jobrunner.local")

LaunchFn = Callable[[ProcessSpec, Callable[[str, str, datetime], None]], Awaitable[ProcessHandle]]

# The exit code recorded for a process the server lost track of (it was restarted or killed
# while the machine ran). -1 is what Fly reports for a VM that died without an exit status.
RECOVERY_EXIT_CODE = -1
# The exit code of a machine whose process could not be made (a missing secret, say), as the
# supervisor reports for a program it could not start.
LAUNCH_FAILED_EXIT_CODE = 1
RECOVERY_ERROR = "local backend restarted while the machine was running"
SHUTDOWN_ERROR = "local backend shut down while the machine was running"
_RUNNING_STATES = (
    "starting", "started", "stopping", "suspending", "suspended", "restarting", "replacing",
)  # fmt: skip
_MAX_BACKOFF = 5.0
_SHUTDOWN_GRACE = 10.0


class Lifecycle:
    """Starts and stops machine processes and records what happened to them."""

    def __init__(
        self,
        registry: Registry,
        logs: LogStore,
        state_dir: Path,
        *,
        launch_fn: LaunchFn = launch,
        environ: Mapping[str, str] | None = None,
        shim: ShimClient | None = None,
    ) -> None:
        self._registry = registry
        self._logs = logs
        self._state_dir = state_dir
        self._launch = launch_fn
        # With a shim, processes are its children and outlive this server (see shim.py);
        # without, they are this process's children (launch_fn) and die with it.
        self._shim = shim
        self._environ = environ
        self._background: set[asyncio.Task[Any]] = set()

    def workdir(self, machine: MachineRecord) -> Path:
        return self._state_dir / "machines" / machine.id

    # booting and running
    def boot(self, machine: MachineRecord, *, delay: float = 0.0) -> None:
        """Enter ``starting`` and launch the process (after ``delay`` seconds, for restarts)."""
        machine.boot_pending = True
        if self._registry.closing:  # the server is stopping: the next one boots it (recover)
            self._registry.save(machine)
            return
        runtime = self._registry.runtime(machine)
        runtime.intent = None
        runtime.poke = asyncio.Event()
        self._registry.set_state(machine, "starting")
        runtime.task = asyncio.create_task(self._run(machine, runtime, delay))

    async def _run(self, machine: MachineRecord, runtime: Runtime, delay: float) -> None:
        exit_: ProcessExit | None = None
        problem: str | None = None
        handle: MachineProcess | None = None
        try:
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(runtime.poke.wait(), delay)
            if runtime.intent is None:
                exit_, problem, handle = await self._launch_and_wait(machine, runtime)
        except Exception as exc:  # a bug here must still end in a recorded exit, not a hang
            logger.exception("machine %s: run failed", machine.id)
            problem = f"internal error of the local backend: {exc!r} (see server.log)"
        machine.boot_pending = False
        runtime.task = None
        self._after_run(machine, runtime, exit_, problem)
        if handle is not None:
            handle.release()  # the exit is recorded: the shim may forget it

    async def _launch_and_wait(
        self, machine: MachineRecord, runtime: Runtime
    ) -> tuple[ProcessExit | None, str | None, MachineProcess | None]:
        try:
            workdir = self.workdir(machine)
            spec = build_spec(machine, workdir, self._environ)
            # On the loop, not in a thread: a mkdir is a few microseconds, while handing it to
            # a thread costs a wake-up and GIL hand-offs on every boot.
            workdir.mkdir(parents=True, exist_ok=True)
            writer = self._logs.writer(machine.app, machine.id, machine.region)
            handle: MachineProcess
            if self._shim is not None:
                handle = await self._shim.launch(machine.id, spec, writer)
            else:
                handle = await self._launch(spec, writer)
        except LaunchProblem as exc:
            return None, str(exc), None
        except (OSError, ValueError) as exc:
            return None, f"could not start the process: {exc}", None
        runtime.handle = handle
        machine.pid = handle.pid if handle.pid > 0 else None
        machine.pid_started_at = handle.started_at
        machine.boot_pending = False
        if runtime.intent is None:
            # Not when the program could not be started at all. A program that ran and already
            # ended (the shim can report both at once) did start.
            if not handle.exited or (await handle.wait()).error is None:
                self._registry.set_state(machine, "started")
                self._registry.add_event(machine, "start", "started", "flyd")
        else:  # stopped, destroyed or updated while it was being launched
            self._stop_handle(machine, runtime)
        try:
            return await handle.wait(), None, handle
        finally:
            runtime.handle = None
            machine.pid = None
            machine.pid_started_at = None

    def _after_run(
        self,
        machine: MachineRecord,
        runtime: Runtime,
        exit_: ProcessExit | None,
        problem: str | None,
    ) -> None:
        # A run's output is on disk before its exit is: a crash right after cannot lose it.
        self._logs.flush()
        intent, runtime.intent = runtime.intent, None
        restarting = self._should_restart(machine, intent, exit_, problem)
        if intent == "shutdown" and problem is None:
            problem = SHUTDOWN_ERROR

        def report() -> None:
            if exit_ is not None or problem is not None:  # else the process never ran
                self.record_exit(
                    machine, exit_, problem, requested=intent is not None, restart=restarting
                )

        if intent == "replace":
            report()  # the update that asked for this carries on from here
        elif intent == "destroy":
            report()
            self.destroy_now(machine, source="user")
        elif restarting:
            report()
            if intent is None:
                machine.restart_count += 1
            self.boot(machine, delay=_backoff(machine.restart_count) if intent is None else 0.0)
        else:
            self.settle_stopped(machine, report)

    def _should_restart(
        self,
        machine: MachineRecord,
        intent: str | None,
        exit_: ProcessExit | None,
        problem: str | None,
    ) -> bool:
        if intent is not None:
            return intent == "restart"
        if problem is not None or exit_ is None or exit_.error is not None:
            return False  # a launch that failed fails again the same way; do not spin on it
        policy, max_retries = restart_policy(machine.config)
        if policy == "always":
            return True
        if policy == "on-failure":
            return exit_.exit_code != 0 and machine.restart_count < max_retries
        return False

    def record_exit(
        self,
        machine: MachineRecord,
        exit_: ProcessExit | None,
        error: str | None,
        *,
        requested: bool,
        restart: bool,
    ) -> None:
        """Add the ``exit`` event, with the details under both keys fly-go reads."""
        if exit_ is not None:
            exit_code = exit_.exit_code
        else:  # no process to report on: it never started, or the server lost it
            exit_code = RECOVERY_EXIT_CODE if error == RECOVERY_ERROR else LAUNCH_FAILED_EXIT_CODE
        sig = exit_.signal if exit_ is not None and exit_.signal else -1
        details: dict[str, Any] = {
            "exit_code": exit_code,
            "guest_exit_code": exit_code,
            "guest_signal": sig,
            "signal": sig,
            "oom_killed": bool(exit_ and exit_.oom_killed),
            "requested_stop": requested or bool(exit_ and exit_.requested_stop),
            "restarting": restart,
            "exited_at": rfc3339_ms(exit_.exited_at if exit_ else self._registry.now()),
        }
        reason = error or (exit_.error if exit_ is not None else None)
        if reason:
            details["error"] = reason
        request = {
            "exit_event": details,
            "MonitorEvent": {"exit_event": details},
            "restart_count": machine.restart_count,
        }
        self._registry.add_event(machine, "exit", "stopped", "flyd", request)

    def settle_stopped(
        self, machine: MachineRecord, report: Callable[[], None] | None = None
    ) -> None:
        """Enter ``stopped`` (then ``report`` the exit), and ``destroying -> destroyed`` when the
        config says auto_destroy."""
        self._registry.set_state(machine, "stopped")
        if report is not None:
            report()
        if machine.config.auto_destroy:
            self.destroy_now(machine, source="flyd")

    def destroy_now(self, machine: MachineRecord, *, source: str) -> None:
        """Destroy a machine whose process is gone; it stays readable until retention ends."""
        self._registry.set_state(machine, "destroying")
        machine.lease = None
        machine.boot_pending = False
        machine.destroyed_at = self._registry.now()
        self._spawn(asyncio.to_thread(shutil.rmtree, self.workdir(machine), True))
        self._registry.set_state(machine, "destroyed")
        self._registry.add_event(machine, "destroy", "destroyed", source)

    # asking a running process to go away
    def request_stop(
        self,
        machine: MachineRecord,
        intent: str,
        signal_number: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Record why the process must stop and ask it to (signal, then SIGKILL after timeout)."""
        runtime = self._registry.runtime(machine)
        runtime.intent = intent
        runtime.stop_signal = signal_number
        runtime.stop_timeout = timeout
        runtime.poke.set()
        if runtime.handle is not None:
            self._stop_handle(machine, runtime)

    def _stop_handle(self, machine: MachineRecord, runtime: Runtime) -> None:
        handle = runtime.handle
        if handle is None:
            return
        sig, timeout = self.stop_settings(machine, runtime.stop_signal, runtime.stop_timeout)
        self._spawn(handle.stop(sig, timeout))

    def stop_settings(
        self, machine: MachineRecord, sig: int | None, timeout: float | None
    ) -> tuple[int, float]:
        """The stop signal and grace period: the request's, else config.stop_config's, else Fly's
        defaults (SIGINT, 5 s)."""
        stop_config = machine.config.stop_config
        if sig is None:
            sig = int(signal.SIGINT)
            if stop_config is not None and stop_config.signal is not None:
                sig = parse_signal(stop_config.signal)
        if timeout is None:
            timeout = 5.0
            if stop_config is not None and stop_config.timeout is not None:
                timeout = parse_duration(stop_config.timeout)
        return sig, timeout

    async def wait_run_over(self, machine: MachineRecord) -> None:
        """Return once no run task is active for ``machine``."""
        runtime = self._registry.runtime(machine)
        while runtime.task is not None:
            await asyncio.shield(runtime.task)

    # suspend and resume
    def suspend(self, machine: MachineRecord) -> None:
        runtime = self._registry.runtime(machine)
        if runtime.handle is None:
            return
        self._registry.set_state(machine, "suspending")
        runtime.handle.suspend()
        self._registry.set_state(machine, "suspended")
        self._registry.add_event(machine, "suspend", "suspended", "user")

    def resume(self, machine: MachineRecord) -> None:
        runtime = self._registry.runtime(machine)
        if runtime.handle is None:
            return
        self._registry.set_state(machine, "starting")
        runtime.handle.resume()
        self._registry.set_state(machine, "started")
        self._registry.add_event(machine, "start", "started", "user")

    def send_signal(self, machine: MachineRecord, sig: int) -> None:
        runtime = self._registry.runtime(machine)
        if runtime.handle is not None:
            runtime.handle.send_signal(sig)

    # server start and stop
    def recover(self) -> None:
        """Account for machines whose process the previous server left behind (section 4)."""
        for machine in list(self._registry.machines.values()):
            if machine.state in _RUNNING_STATES:
                pid, started_at = machine.pid, machine.pid_started_at
                if pid is not None and pid_alive(pid, started_at):
                    logger.warning("machine %s: killing its orphaned process %s", machine.id, pid)
                    kill_orphan_group(pid, started_at)
                machine.pid = None
                machine.pid_started_at = None
                machine.boot_pending = False
                self.settle_stopped(machine, partial(self._report_lost, machine))
            elif machine.state == "destroying":
                self.destroy_now(machine, source="flyd")
            elif machine.state in ("created", "stopped") and machine.boot_pending:
                self.boot(machine)  # a boot that was owed when the last server stopped

    def adopt(self, live: list[LiveRun]) -> None:
        """Take over after the previous server: re-attach to the machines whose process the shim
        still runs, and wait for the (replayed) exits of those that ended in between.

        Call before ``ShimClient.adopted()``; a machine whose exit the shim cannot replay (it
        died too) is recorded with exit code -1, as ``recover`` does without a shim.
        """
        assert self._shim is not None
        shim = self._shim
        by_key = {run.key: run for run in live}
        for machine in list(self._registry.machines.values()):
            if machine.state in _RUNNING_STATES:
                writer = self._logs.writer(machine.app, machine.id, machine.region)
                run = by_key.pop(machine.id, None)
                if run is not None and machine.pid not in (None, run.pid):
                    by_key[machine.id] = run  # not the process this record knows: ends below
                    run = None
                handle: MachineProcess
                if run is not None:
                    handle = shim.adopt(run, writer)
                else:
                    handle = shim.expect(machine.id, machine.pid, machine.pid_started_at, writer)
                self._follow(machine, handle, running=run is not None)
            elif machine.state == "destroying":
                self.destroy_now(machine, source="flyd")
            elif machine.state in ("created", "stopped") and machine.boot_pending:
                self.boot(machine)  # a boot that was owed when the last server stopped
        for run in by_key.values():  # its machine is no longer running here: end it
            logger.warning("machine %s: killing process %s it no longer owns", run.key, run.pid)
            stray = shim.adopt(run, lambda *_: None)
            stray.kill()
            self._spawn(_release_after_exit(stray))

    def _follow(self, machine: MachineRecord, handle: MachineProcess, *, running: bool) -> None:
        runtime = self._registry.runtime(machine)
        runtime.intent = None
        runtime.poke = asyncio.Event()
        runtime.handle = handle
        machine.boot_pending = False
        if running and machine.state == "starting":
            self._registry.set_state(machine, "started")
            self._registry.add_event(machine, "start", "started", "flyd")
        runtime.task = asyncio.create_task(self._run_adopted(machine, runtime, handle))
        # What the last server was doing to it when it stopped is done again.
        intent = {"stopping": "stop", "restarting": "restart", "replacing": "stop"}
        if machine.state in intent:
            self.request_stop(machine, intent[machine.state])

    async def _run_adopted(
        self, machine: MachineRecord, runtime: Runtime, handle: MachineProcess
    ) -> None:
        exit_: ProcessExit | None = None
        problem: str | None = None
        try:
            exit_ = await handle.wait()
        except Exception as exc:
            logger.exception("machine %s: following its process failed", machine.id)
            problem = f"internal error of the local backend: {exc!r} (see server.log)"
        finally:
            runtime.handle = None
            machine.pid = None
            machine.pid_started_at = None
        machine.boot_pending = False
        runtime.task = None
        self._after_run(machine, runtime, exit_, problem)
        handle.release()

    async def detach(self) -> None:
        """Stop following the processes without touching them: the shim keeps them running and
        the next server adopts them (``jobrunner local stop`` without ``--stop-machines``)."""
        tasks = [
            t for m in self._registry.machines.values() if (t := self._registry.runtime(m).task)
        ]
        for task in [*tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*tasks, *self._background, return_exceptions=True)

    def _report_lost(self, machine: MachineRecord) -> None:
        self.record_exit(machine, None, RECOVERY_ERROR, requested=False, restart=False)

    async def shutdown(self) -> None:
        """Stop every running machine (its stop signal, then SIGKILL) and record the exits."""
        running = [m for m in self._registry.machines.values() if self._registry.runtime(m).task]
        for machine in running:
            sig, timeout = self.stop_settings(machine, None, None)
            self.request_stop(machine, "shutdown", sig, min(timeout, _SHUTDOWN_GRACE))
        tasks = [t for m in running if (t := self._registry.runtime(m).task) is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=_SHUTDOWN_GRACE + 5.0)
        if self._background:  # pending stops and workdir removals: a moment to finish
            await asyncio.wait(set(self._background), timeout=5.0)
        for task in list(self._background):
            task.cancel()

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task: asyncio.Task[Any] = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception())


async def _release_after_exit(handle: MachineProcess) -> None:
    await handle.wait()
    handle.release()


def _backoff(restart_count: int) -> float:
    """Seconds to wait before a policy restart: 0.1 s, doubling, at most 5 s."""
    return float(min(0.1 * 2 ** max(restart_count - 1, 0), _MAX_BACKOFF))
