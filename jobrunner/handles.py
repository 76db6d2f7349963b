"""Holding on to runs in flight: ``RunResult`` (how a run ended), ``AsyncRunHandle``/``RunHandle``,
``as_completed``, and ``RunExecutor`` (``concurrent.futures`` for jobs).

A handle names one run in the ledger. What it knows in memory is only a cache: every handle can be
rebuilt from the run id alone (``runner.get(run_id)``, in any process sharing the ledger). Waiting
costs nothing for a run this process drives (``submit``): the background drive sets an in-process
event when the outcome and the run's last log lines are stored. For any other run (queued for the
workers, or driven by another process) waiting polls the ledger every ``poll_interval`` seconds and
never drives the run itself: that is the workers' job.

``AsyncRunHandle`` holds the logic; ``RunHandle`` is its synchronous face, each method a one-line
forward through the owning ``JobRunner``'s :class:`~jobrunner._sync.Portal`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, Unpack, overload

import anyio

from jobrunner._sync import Portal
from jobrunner.errors import JobrunnerError
from jobrunner.states import RunState
from jobrunner.store import Attempt, Run

if TYPE_CHECKING:
    from jobrunner.api import AsyncJobRunner, JobRef, JobRunner, Overrides

__all__ = [
    "AsyncRunHandle",
    "RunExecutor",
    "RunHandle",
    "RunResult",
    "RunnerClosed",
    "as_completed",
]

P = ParamSpec("P")
T = TypeVar("T")

# After a run driven elsewhere has finished, ``follow`` keeps reading until no line has arrived
# for this long: its driver copies the last lines after recording the outcome (Fly's logs API
# can lag by seconds; the local backend has every line stored at the exit).
FOLLOW_SETTLE = {"local": 1.0, "fly": 10.0}


class RunnerClosed(JobrunnerError):
    """The ``JobRunner`` was closed (or not opened) before the call could be served."""


class RunnerPortal(Portal):
    """The portal of one ``JobRunner``: once closed, every call raises ``RunnerClosed``."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self.closed:
            raise RunnerClosed("this JobRunner is closed")
        return super().call(fn, *args, **kwargs)

    def iterate(self, make: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        if self.closed:
            raise RunnerClosed("this JobRunner is closed")
        return super().iterate(make)

    def close(self) -> None:
        self.closed = True
        super().close()


@dataclass(frozen=True)
class RunResult:
    """How a run ended, read from the ledger."""

    id: str
    job: str
    outcome: RunState
    exit_code: int | None
    oom_killed: bool
    machine_id: str | None  # the last attempt's machine
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    reason: str | None

    @property
    def ok(self) -> bool:
        """True when the run succeeded."""
        return self.outcome is RunState.SUCCEEDED

    @classmethod
    def from_records(cls, run: Run, last: Attempt | None) -> RunResult:
        """The result of a finished ``run`` whose latest attempt is ``last``."""
        outcome = RunState(run.state)
        return cls(
            id=run.id,
            job=run.job_name,
            outcome=outcome,
            exit_code=run.exit_code,
            oom_killed=outcome is RunState.OOM_KILLED or bool(last and last.oom_killed),
            machine_id=last.machine_id if last else None,
            attempts=run.attempts,
            started_at=run.started_at,
            finished_at=run.finished_at,
            duration_s=run.duration_s,
            reason=run.reason,
        )


class LocalDrive:
    """A run this process drives in the background; set once its outcome and logs are stored.

    Touched only on the owning runner's event loop.
    """

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.done = anyio.Event()
        self.record: Run | None = None
        self._result: RunResult | None = None
        self._error: BaseException | None = None

    def finish(self, record: Run, result: RunResult) -> None:
        self.record, self._result, self.state = record, result, result.outcome
        self.done.set()

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self._error = error
            self.done.set()

    def outcome(self) -> RunResult:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class _HandleBase:
    """What both faces share: the run id, the cached record and state, equality by run id."""

    @property
    def _core(self) -> AsyncRunHandle:
        raise NotImplementedError

    @property
    def id(self) -> str:
        """The run's full id."""
        return self._core._record.id

    @property
    def record(self) -> Run:
        """The run's ledger row as last read (``refresh()`` reads it again)."""
        core = self._core
        local = core._local
        return local.record if local is not None and local.record is not None else core._record

    @property
    def state(self) -> RunState:
        """The run's state: live for a run this process drives, else as of the last read."""
        core = self._core
        return core._local.state if core._local is not None else RunState(core._record.state)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.state.value}>"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, _HandleBase) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


class AsyncRunHandle(_HandleBase):
    """A run, from asyncio code. Get one from ``AsyncJobRunner.submit``, ``enqueue`` or ``get``."""

    def __init__(self, owner: AsyncJobRunner, record: Run, local: LocalDrive | None) -> None:
        self._owner = owner
        self._record = record
        self._local = local

    @property
    def _core(self) -> AsyncRunHandle:
        return self

    async def wait(self, timeout: float | None = None) -> RunResult:
        """The run's result once it has finished (raises ``TimeoutError`` after ``timeout`` s).

        Raises the drive's error instead when this process drove the run and could not finish it
        (the API or the ledger failed); the run is then left for a worker or
        ``jobrunner runs reconcile``.
        """
        with anyio.move_on_after(timeout):
            if self._local is not None:
                await self._local.done.wait()
                return self._local.outcome()
            return await self._poll_result()
        raise TimeoutError(f"run {self.id} did not finish within {timeout} s")

    async def result(self, timeout: float | None = None) -> RunResult:
        """Same as ``wait``: the ``concurrent.futures`` spelling."""
        return await self.wait(timeout)

    async def _poll_result(self) -> RunResult:
        ledger = self._owner.runner.ledger
        while True:
            self._record = await ledger.get_run(self.id)
            if self._record.is_finished:
                return RunResult.from_records(self._record, await ledger.latest_attempt(self.id))
            await anyio.sleep(self._owner.poll_interval)

    async def refresh(self) -> RunState:
        """Read the run's row again; its state now."""
        self._record = await self._owner.runner.ledger.get_run(self.id)
        if self._local is not None and not self._local.done.is_set():
            self._local.state = RunState(self._record.state)
        return self.state

    async def cancel(self) -> bool:
        """Ask the run to stop; returns once the request is recorded in the ledger.

        True when this call recorded the cancel, False when the run had already finished. The
        run's driver (this process, a worker) stops its machine within about a second; a run
        nobody drives is finished as ``cancelled`` here. ``wait()`` reports the outcome, which is
        ``cancelled`` unless the run finished first.
        """
        runner = self._owner.runner
        recorded = await runner.ledger.request_cancel(self.id)
        # Then what the CLI's cancel does: stop our own drive now, or finish an orphan here.
        self._record = await runner.cancel(self.id)
        return recorded

    async def logs(self) -> list[str]:
        """The run's output lines stored so far, in order."""
        lines = await self._owner.runner.ledger.get_logs(self.id)
        return [line.message for line in lines]

    async def follow(self, *, poll: float | None = None) -> AsyncIterator[str]:
        """Yield the run's output lines as they are stored, until it has finished and every line
        is in (for a run driven elsewhere: until none has come for a few seconds after it ended).
        """
        ledger = self._owner.runner.ledger
        interval = self._owner.poll_interval if poll is None else poll
        settle = FOLLOW_SETTLE.get(self._owner.runner.backend, 10.0)
        after = 0
        quiet_since: float | None = None
        while True:
            ended = await self._ended()
            lines = await ledger.get_logs(self.id, after_id=after)
            for line in lines:
                after = line.id
                yield line.message
            if ended:
                if self._local is not None:
                    return  # our drive set ``done`` only after the last lines were stored
                now = time.monotonic()
                if lines or quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= settle:
                    return
            with anyio.move_on_after(interval):
                if self._local is not None:
                    await self._local.done.wait()
                else:
                    await anyio.sleep(interval)

    async def _ended(self) -> bool:
        """Whether the run is over (for our own drives: and its last lines are stored)."""
        if self._local is not None:
            return self._local.done.is_set()
        self._record = await self._owner.runner.ledger.get_run(self.id)
        return self._record.is_finished


class RunHandle(_HandleBase):
    """A run, from synchronous code: the blocking face of :class:`AsyncRunHandle`.

    Safe to share between threads: every call is forwarded to the runner's event loop thread.
    """

    def __init__(self, core: AsyncRunHandle, portal: RunnerPortal) -> None:
        self._async = core
        self._portal = portal

    @property
    def _core(self) -> AsyncRunHandle:
        return self._async

    def wait(self, timeout: float | None = None) -> RunResult:
        """The run's result once it has finished (raises ``TimeoutError`` after ``timeout`` s)."""
        return self._portal.call(self._async.wait, timeout)

    def result(self, timeout: float | None = None) -> RunResult:
        """Same as ``wait``: the ``concurrent.futures`` spelling."""
        return self._portal.call(self._async.result, timeout)

    def refresh(self) -> RunState:
        """Read the run's row again; its state now."""
        return self._portal.call(self._async.refresh)

    def cancel(self) -> bool:
        """Ask the run to stop; True once recorded, False if it had already finished."""
        return self._portal.call(self._async.cancel)

    def logs(self) -> list[str]:
        """The run's output lines stored so far, in order."""
        return self._portal.call(self._async.logs)

    def follow(self, *, poll: float | None = None) -> Iterator[str]:
        """Yield output lines as they are stored, until the run has finished and drained."""
        return self._portal.iterate(lambda: self._async.follow(poll=poll))


# ---- as_completed ----------------------------------------------------------------------------


@overload
def as_completed(
    handles: Iterable[RunHandle], timeout: float | None = None
) -> Iterator[RunHandle]: ...


@overload
def as_completed(
    handles: Iterable[AsyncRunHandle], timeout: float | None = None
) -> AsyncIterator[AsyncRunHandle]: ...


def as_completed(
    handles: Iterable[RunHandle] | Iterable[AsyncRunHandle], timeout: float | None = None
) -> Iterator[RunHandle] | AsyncIterator[AsyncRunHandle]:
    """Yield the handles as their runs finish, like ``concurrent.futures.as_completed``.

    ``RunHandle`` objects give a plain iterator (``for h in as_completed(hs)``),
    ``AsyncRunHandle`` objects an async one (``async for h in as_completed(hs)``). A handle
    whose wait failed is yielded too: its ``result()`` raises the error. Raises ``TimeoutError``
    when runs are left unfinished ``timeout`` seconds after the call.
    """
    unique = list(dict.fromkeys(handles))  # by run id, first occurrence kept
    deadline = None if timeout is None else time.monotonic() + timeout
    if all(isinstance(h, AsyncRunHandle) for h in unique):
        return _AsyncCompleted([h for h in unique if isinstance(h, AsyncRunHandle)], deadline)
    if all(isinstance(h, RunHandle) for h in unique):
        return _sync_completed([h for h in unique if isinstance(h, RunHandle)], deadline)
    raise TypeError("as_completed takes RunHandle or AsyncRunHandle objects, not a mix of both")


class _AsyncCompleted:
    """The async iterator of ``as_completed``: one watcher task per handle, each started in its
    handle's runner, reports to a stream read here (no task group spans a ``yield``)."""

    def __init__(self, handles: list[AsyncRunHandle], deadline: float | None) -> None:
        self._handles = handles
        self._deadline = deadline
        self._left = len(handles)
        self._send, self._receive = anyio.create_memory_object_stream[AsyncRunHandle](
            max(1, len(handles))
        )
        self._scopes: list[anyio.CancelScope] = []
        self._started = False

    def __aiter__(self) -> _AsyncCompleted:
        return self

    def __iter__(self) -> Iterator[Any]:
        # ``as_completed([])`` cannot tell which kind was meant: both loops see nothing.
        if self._handles:
            raise TypeError("use `async for` over as_completed() of AsyncRunHandle objects")
        return iter(())

    async def __anext__(self) -> AsyncRunHandle:
        if not self._started:
            self._started = True
            for handle in self._handles:
                scope = anyio.CancelScope()
                self._scopes.append(scope)
                handle._owner._spawn(self._watch, handle, scope)
        if self._left == 0:
            await self.aclose()
            raise StopAsyncIteration
        left = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        with anyio.move_on_after(left):
            handle = await self._receive.receive()
            self._left -= 1
            return handle
        await self.aclose()
        raise TimeoutError(f"{self._left} of {len(self._handles)} runs did not finish in time")

    async def _watch(self, handle: AsyncRunHandle, scope: anyio.CancelScope) -> None:
        try:
            with scope, contextlib.suppress(Exception):
                await handle.wait()
        finally:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                self._send.send_nowait(handle)

    async def aclose(self) -> None:
        """Stop watching the handles not yielded yet."""
        for scope in self._scopes:
            scope.cancel()
        self._send.close()
        self._receive.close()


def _sync_completed(handles: list[RunHandle], deadline: float | None) -> Iterator[RunHandle]:
    """``as_completed`` for sync handles: each runner's handles are watched on its own loop."""
    by_portal: dict[int, list[RunHandle]] = {}
    for handle in handles:
        by_portal.setdefault(id(handle._portal), []).append(handle)
    groups = list(by_portal.values())
    if len(groups) == 1:
        yield from _one_portal(groups[0], deadline)
        return
    # Handles of several JobRunners: one thread per runner feeds a queue read here.
    done: queue.Queue[RunHandle | BaseException | None] = queue.Queue()

    def feed(group: list[RunHandle]) -> None:
        try:
            for handle in _one_portal(group, deadline):
                done.put(handle)
        except BaseException as exc:
            done.put(exc)
        finally:
            done.put(None)

    for group in groups:
        threading.Thread(target=feed, args=(group,), daemon=True).start()
    finished = 0
    while finished < len(groups):
        item = done.get()
        if item is None:
            finished += 1
        elif isinstance(item, BaseException):
            raise item
        else:
            yield item


def _one_portal(handles: list[RunHandle], deadline: float | None) -> Iterator[RunHandle]:
    by_core = {id(h._core): h for h in handles}
    cores = [h._core for h in handles]
    for core in handles[0]._portal.iterate(lambda: _AsyncCompleted(cores, deadline)):
        yield by_core[id(core)]


# ---- the executor ----------------------------------------------------------------------------


class RunExecutor(Executor):
    """``concurrent.futures`` for jobs: ``submit(job)`` gives a ``Future`` of its ``RunResult``.

    At most ``max_workers`` runs are driven at once; the others wait in memory (they are not in
    the ledger until they start). ``shutdown(wait=True)`` waits for every future;
    ``cancel_futures=True`` drops those not started. Closing the ``JobRunner`` ends the running
    ones with ``RunnerClosed`` (their runs are left to the workers).
    """

    def __init__(self, runner: JobRunner, max_workers: int, *, limiter: anyio.Semaphore) -> None:
        """Internal: use ``JobRunner.executor(max_workers)``."""
        self.max_workers = max_workers
        self._runner = runner
        self._lock = threading.Lock()
        self._futures: set[Future[RunResult]] = set()
        self._shutdown = False
        self._limiter = limiter

    def submit(  # type: ignore[override]  # a job, not a callable: see the TypeError below
        self, job: JobRef, /, *args: object, **overrides: Unpack[Overrides]
    ) -> Future[RunResult]:
        """Run ``job`` (with ``env``/``timeout`` overrides); a Future of its ``RunResult``."""
        if callable(job) or args:
            raise TypeError(
                "RunExecutor.submit takes a Job (or a job file's name or path) and keyword "
                "overrides, not a function and its arguments: jobs run on machines, not in this "
                "process (use concurrent.futures.ThreadPoolExecutor for Python functions)"
            )
        future: Future[RunResult] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit runs after shutdown()")
            self._futures.add(future)
        future.add_done_callback(self._forget)
        try:
            self._runner._portal.call(
                self._runner._async._start_future, job, overrides, future, self._limiter
            )
        except BaseException:
            self._forget(future)
            raise
        return future

    def _forget(self, future: Future[RunResult]) -> None:
        with self._lock:
            self._futures.discard(future)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more jobs; with ``wait``, return when every submitted run has ended."""
        with self._lock:
            self._shutdown = True
            futures = list(self._futures)
        if cancel_futures:
            for future in futures:
                future.cancel()
        if wait:
            concurrent.futures.wait(futures)
