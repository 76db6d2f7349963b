"""The server's in-memory view of apps and machines, kept in step with the database.

Every state change and event goes through here, so three things always happen together: the
record changes, the change is written to the database, and everyone waiting on the machine
(long-polls of the wait endpoint) is woken. Waiters sleep on an ``asyncio.Event`` per machine
that is replaced on every change, so 500 waiters cost 500 small objects, not 500 threads.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jobrunner.clock import Clock
from jobrunner.local.api.errors import not_found
from jobrunner.local.fleet import ids as ids
from jobrunner.local.fleet.records import AppRecord, EventRecord, MachineRecord
from jobrunner.local.process.supervisor import MachineProcess
from jobrunner.local.state.database import StateDatabase
from jobrunner.machines.models import MachineEvent, MachineRequest

__all__ = ["Registry", "Runtime", "Transition"]

# Events kept per machine; a crash-looping `always` machine would otherwise grow without bound.
MAX_EVENTS = 500
# State changes remembered per machine for waiters that must not miss a passing state.
_TRANSITIONS_KEPT = 64


@dataclass(frozen=True)
class Transition:
    seq: int
    state: str
    instance_id: str


@dataclass
class Runtime:
    """What the server knows about a machine's process right now (never persisted)."""

    handle: MachineProcess | None = None
    task: asyncio.Task[None] | None = None  # supervises the current boot, from launch to exit
    # Why the process is being stopped, decided by whoever asked: "stop", "restart", "destroy",
    # "replace" (update) or "shutdown" (the server is stopping). None: it exited on its own.
    intent: str | None = None
    stop_signal: int | None = None
    stop_timeout: float | None = None
    poke: asyncio.Event = field(default_factory=asyncio.Event)  # set with an intent: ends a backoff
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    transitions: deque[Transition] = field(default_factory=lambda: deque(maxlen=_TRANSITIONS_KEPT))


class Registry:
    """Apps, machines and their runtimes; the single writer of machine state and events.

    Convention: an event is added right after the state change it reports, so a waiter given
    ``from_event_id`` of the newest event waits for the *next* change.
    """

    def __init__(self, store: StateDatabase, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.apps: dict[str, AppRecord] = {}
        self.machines: dict[str, MachineRecord] = {}
        self._runtimes: dict[str, Runtime] = {}
        self.closing = False
        # Writes wait for the end of the loop iteration, so the several changes one action
        # makes to a machine (state, event, state) cost one transaction and one JSON document,
        # not one each. flush_writes() runs before any HTTP answer leaves (server.py), before
        # the shim is told a record is stored, and at shutdown.
        self._dirty: dict[str, MachineRecord] = {}
        self._new_events: list[tuple[str, EventRecord]] = []
        self._flush_handle: asyncio.Handle | None = None

    def load(self) -> None:
        self.apps = {app.name: app for app in self.store.load_apps()}
        self.machines = {m.id: m for m in self.store.load_machines()}

    # lookups
    def app(self, name: str) -> AppRecord:
        app = self.apps.get(name)
        if app is None:
            raise not_found(f"app not found: {name!r} (create it with POST /v1/apps)")
        return app

    def machine(self, app: str, machine_id: str) -> MachineRecord:
        """A machine of ``app``, destroyed ones included (they stay readable until purged)."""
        self.app(app)
        machine = self.machines.get(machine_id)
        if machine is None or machine.app != app:
            raise not_found(f"machine not found: {machine_id}")
        return machine

    def live_machine(self, app: str, machine_id: str) -> MachineRecord:
        """A machine that can still be acted on; 404 once it is destroyed."""
        machine = self.machine(app, machine_id)
        if machine.state in ("destroying", "destroyed"):
            raise not_found(f"machine not found: {machine_id} was destroyed")
        return machine

    def runtime(self, machine: MachineRecord) -> Runtime:
        runtime = self._runtimes.get(machine.id)
        if runtime is None:
            runtime = self._runtimes[machine.id] = Runtime()
        return runtime

    def forget(self, machine_id: str) -> None:
        """Drop a machine entirely (retention expired, or its app was deleted)."""
        self.flush_writes()
        self.machines.pop(machine_id, None)
        self._runtimes.pop(machine_id, None)
        self.store.delete_machine(machine_id)

    # changes
    def now(self) -> datetime:
        return self.clock.now()

    def save(self, machine: MachineRecord) -> None:
        machine.updated_at = self.now()
        self._dirty[machine.id] = machine
        self._schedule_flush()

    def flush_writes(self) -> None:
        """Write the machines and events changed since the last flush, in one transaction."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._dirty and not self._new_events:
            return
        dirty, self._dirty = self._dirty, {}
        events, self._new_events = self._new_events, []
        with self.store.batch():
            for machine_id, record in events:
                self.store.add_event(machine_id, record)
            for machine in dirty.values():
                self.store.save_machine(machine)

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (start-up, tools): write at once
                self.flush_writes()
                return
            self._flush_handle = loop.call_soon(self.flush_writes)

    def set_state(self, machine: MachineRecord, state: str) -> None:
        """Enter ``state``: record it, persist it and wake the waiters."""
        machine.state = state
        machine.state_seq = machine.take_seq()
        runtime = self.runtime(machine)
        runtime.transitions.append(Transition(machine.state_seq, state, machine.instance_id))
        self.save(machine)
        self.notify(machine)

    def add_event(
        self,
        machine: MachineRecord,
        type_: str,
        status: str,
        source: str,
        request: dict[str, Any] | None = None,
    ) -> EventRecord:
        """Record an event (newest first) with a ULID id and a millisecond timestamp."""
        event = MachineEvent(
            id=ids.ulid(),
            type=type_,
            status=status,
            source=source,
            timestamp=int(self.now().timestamp() * 1000),
            request=MachineRequest.model_validate(request) if request is not None else None,
        )
        record = EventRecord(event=event, seq=machine.take_seq())
        machine.events.insert(0, record)
        self._new_events.append((machine.id, record))
        if len(machine.events) > MAX_EVENTS:
            del machine.events[MAX_EVENTS:]
            self.flush_writes()  # the pending inserts first, then the delete
            self.store.drop_events_before(machine.id, machine.events[-1].seq)
        self.save(machine)
        self.notify(machine)
        return record

    def notify(self, machine: MachineRecord) -> None:
        """Wake everyone waiting on ``machine`` (each waiter re-checks what it waits for)."""
        runtime = self.runtime(machine)
        woken, runtime.changed = runtime.changed, asyncio.Event()
        woken.set()

    def wake_all(self) -> None:
        for machine in self.machines.values():
            self.notify(machine)
