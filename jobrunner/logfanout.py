"""Follows the logs of many machines with one logs API poll loop per app.

Why: a poll loop per machine (what jobrunner had before) would make a worker with 1,000 runs in
flight send about 1,000 requests per poll interval to Fly. The logs API filters by app and
every entry names its ``instance`` (the machine id, fly-machines-api.md section 10), so one stream
per app can serve every machine of that app this process follows.

Design (no task or thread per machine; a follower is a small record):

* **Stream per app.** ``run()`` starts one poll task per app while the app has followers. It pages
  ``get_logs(app=app, next_token=token)`` with no instance filter until a page comes back empty
  or repeats the token, then sleeps ``poll_interval``. Entries are routed by ``entry.instance``.
  Each follower's lines of one page are masked with its own ``StreamMasker`` (a secret cut
  across two lines included: a line that may end with a secret's beginning waits up to
  ``logsync.HOLD_SECONDS`` for the next line of its stream) and stored with ONE ``add_logs``
  call, then streamed as ``RunEvent(kind="log")`` (a line seen twice at a page edge is streamed
  once). When the app's last follower is dropped, the task ends.
* **Start token.** A stream starts at ``token_for(earliest since - START_MARGIN)`` of the followers
  it was started for: without a token the API answers only the newest 100 lines.
* **Lines of instances nobody follows yet** (a machine prints before its create call returned to
  us) are kept in a bounded per-app buffer (the last ``BUFFER_SECONDS``, at most ``BUFFER_LINES``)
  and handed over by ``follow()``.
* **Catch-up.** A machine whose lines may have been read before it was followed and are no longer
  buffered (its ``since`` is older than the stream's start, or the buffer evicted lines fetched
  after its ``since``: a run adopted after a crash, a busy app) gets a one-off
  ``get_logs(instance=machine_id, next_token=token_for(since - START_MARGIN))`` paged up to the
  present, by at most ``MAX_CATCH_UPS`` worker tasks. Meanwhile the stream holds the machine's
  new lines back and delivers them afterwards, so lines stay in order; the store dedupes overlaps
  on the entry id and the event stream skips lines the catch-up already streamed.
* **Drain.** ``machine_exited()`` keeps the follower for ``drain_grace`` seconds (the logs API
  lags behind machines). It is dropped, and ``drained()`` wakes, once a poll round that started
  after that deadline reached the present.
* **Errors.** Like ``poll_log_pages``: transient errors back off (doubling, up to 8 s). A token
  we made up that the API refuses (400) falls back to the empty token.
  A persistent failure (401/404, a refused API token, or ``DOWN_AFTER_ERRORS`` failed rounds in a
  row) logs one warning and retries every ``SLOW_RETRY`` seconds; exited machines are then dropped
  at their deadline. Nothing here raises into the runs: a run must not fail for want of its logs.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
from anyio.abc import TaskGroup

from jobrunner.clock import SYSTEM_CLOCK, Clock
from jobrunner.events import EventHandler, RunEvent
from jobrunner.logsync import (
    START_MARGIN,
    SecretMasker,
    StreamMasker,
    parse_ts,
    stream_of,
    token_for,
)
from jobrunner.machines import AsyncMachinesClient
from jobrunner.machines.errors import BadRequest, MachinesError, NotFound, Unauthorized
from jobrunner.machines.logs import MAX_CONSECUTIVE_ERRORS
from jobrunner.machines.models import LogEntry, LogsPage
from jobrunner.store import LogLineIn

__all__ = ["AddLogs", "LogFanout"]

logger = logging.getLogger(__name__)

AddLogs = Callable[[str, int, list[LogLineIn]], Awaitable[int]]

# Lines of instances nobody follows yet, per app: long enough to cover a create call that
# returns after the machine printed, small enough that other workers' machines cannot fill memory.
BUFFER_SECONDS = 60.0
BUFFER_LINES = 10_000
# A follower's undelivered lines (held during its catch-up, or while the store fails). Beyond
# this the oldest go: during a catch-up they are re-read by it anyway.
BACKLOG_LINES = 10_000
# Keys of the last lines streamed per follower, to stream a line repeated at a page edge once.
RECENT_KEYS = 256
MAX_CATCH_UPS = 4
# A round ends after this many pages even if more are waiting, so that drains and new
# followers' backlogs are seen to while an app prints faster than we page.
MAX_PAGES_PER_ROUND = 20
# Error handling. Each get_logs call already carries the client's own retries, so a few failed
# rounds in a row are a real outage, not a blip.
ERROR_FIRST_DELAY = 0.5
ERROR_MAX_DELAY = 8.0
DOWN_AFTER_ERRORS = 3
SLOW_RETRY = 30.0
# While a stream is failing (but not yet "down"), an exited machine waits at most this long past
# its drain deadline before it is dropped: the run behind it must finish.
FAILING_DRAIN_EXTRA = 30.0
# The longest an app loop sleeps between checks of drains and backlogs.
MAX_IDLE = 1.0


class _RecentKeys:
    """A bounded set of the most recently streamed line keys."""

    def __init__(self, size: int = RECENT_KEYS) -> None:
        self._order: deque[str] = deque()
        self._keys: set[str] = set()
        self._size = size

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        if key in self._keys:
            return
        self._keys.add(key)
        self._order.append(key)
        if len(self._order) > self._size:
            self._keys.discard(self._order.popleft())


@dataclass(eq=False)
class _Follower:
    app: str
    machine_id: str
    run_id: str
    attempt: int
    since: datetime
    masker: SecretMasker
    # Lines routed to this machine and not yet stored (held while catching_up).
    backlog: list[LogEntry] = field(default_factory=list)
    catching_up: bool = False
    # After a catch-up: held lines older than its last line were streamed by it already.
    skip_before: datetime | None = None
    recent: _RecentKeys = field(default_factory=_RecentKeys)
    exited_at: float | None = None  # clock.monotonic() at machine_exited()
    exit_deadline_ns: int | None = None  # wall clock deadline, comparable with stream tokens
    done: anyio.Event | None = None  # made on first drained(): needs a running event loop
    dropped: bool = False
    store_warned: bool = False
    # Masks this machine's lines, secrets cut across two lines included (logsync.StreamMasker).
    masking: StreamMasker = field(init=False)

    def __post_init__(self) -> None:
        self.masking = StreamMasker(self.masker)

    def hold(self, entries: Iterable[LogEntry]) -> None:
        self.backlog.extend(entries)
        if len(self.backlog) > BACKLOG_LINES:
            del self.backlog[: len(self.backlog) - BACKLOG_LINES]

    def keep_first(self, entries: list[LogEntry]) -> None:
        """Put lines that could not be stored back in front, for the next flush."""
        self.backlog[:0] = entries
        del self.backlog[: max(0, len(self.backlog) - BACKLOG_LINES)]


@dataclass(frozen=True)
class _Buffered:
    fetched: float  # clock.monotonic(), for the age limit
    fetched_wall: float  # clock.time(), compared with a later follower's since
    entry: LogEntry


@dataclass(eq=False)
class _Stream:
    app: str
    start_since: datetime  # earliest since of the followers it starts for
    followers: dict[str, _Follower] = field(default_factory=dict)
    started: bool = False  # the start token is fixed once the first request went out
    running: bool = False  # a task runs its loop
    token: str | None = None
    made_token: bool = False  # ours, not the API's: dropped if refused
    # Unix seconds (log platform time): lines stamped from here on are read by this stream.
    covers_from: float | None = None
    buffer: deque[_Buffered] = field(default_factory=deque)
    buffered: Counter[str] = field(default_factory=Counter)
    evicted_wall: float | None = None  # clock.time() when the newest evicted line was fetched
    dirty: set[str] = field(default_factory=set)  # followers with a backlog to deliver
    errors: int = 0
    down: bool = False
    next_fetch: float = 0.0  # clock.monotonic()
    caught_up_at: float | None = None  # start of the last round that reached the present

    def position_ns(self) -> int | None:
        """The stream's token as a Unix-nanosecond time, when it is one."""
        try:
            return int(self.token) if self.token else None
        except ValueError:
            return None


class LogFanout:
    """Follows the logs of many machines with one logs API poll loop per app."""

    def __init__(
        self,
        client: AsyncMachinesClient,
        add_logs: AddLogs,
        *,
        on_event: EventHandler,
        poll_interval: float,
        drain_grace: float,
        clock: Clock | None = None,
        on_copied: Callable[[str, int], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self._add_logs = add_logs
        # Told (run id, attempt) once a machine's lines are all stored after its drain, so the
        # ledger can say so; not told when the logs could not be had (someone copies them later).
        self._on_copied = on_copied
        self._on_event = on_event
        self._poll = poll_interval
        self._grace = drain_grace
        self._clock = clock or SYSTEM_CLOCK
        self._followers: dict[str, _Follower] = {}
        self._streams: dict[str, _Stream] = {}
        self._catch_ups: deque[_Follower] = deque()
        self._workers = 0
        self._wake: anyio.Event | None = None
        # Once the API refused a made-up start token, catch-ups do not offer it one either.
        self._tokens_refused = False

    # -- the public interface ---------------------------------------------------------------

    @property
    def polling_apps(self) -> frozenset[str]:
        """Apps whose poll loop is running now (for monitoring and tests)."""
        return frozenset(app for app, stream in self._streams.items() if stream.running)

    @property
    def busy(self) -> bool:
        """Whether any machine is followed (running, or draining after its exit)."""
        return bool(self._followers)

    def following(self, machine_id: str) -> bool:
        """Whether this fan-out copies ``machine_id``'s lines now (or drains them)."""
        return machine_id in self._followers

    def follow(
        self,
        *,
        app: str,
        machine_id: str,
        run_id: str,
        attempt: int,
        since: datetime,
        masker: SecretMasker,
    ) -> None:
        """Start copying this machine's lines (from ``since`` - START_MARGIN) into the ledger.

        Idempotent per machine. ``since`` must be taken before the machine was created (the
        attempt's creation time), as lines fetched before it may not be kept for it.
        """
        if machine_id in self._followers:
            return
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        follower = _Follower(app, machine_id, run_id, attempt, since, masker)
        stream = self._streams.get(app)
        if stream is None:
            stream = self._streams[app] = _Stream(app, start_since=since)
        elif not stream.started:
            stream.start_since = min(stream.start_since, since)
        else:
            follower.hold(self._take_buffered(stream, machine_id))
            if self._needs_catch_up(stream, since):
                follower.catching_up = True
                self._catch_ups.append(follower)
            elif follower.backlog:
                stream.dirty.add(machine_id)
        stream.followers[machine_id] = follower
        self._followers[machine_id] = follower
        self._wake_service()

    def machine_exited(self, machine_id: str) -> None:
        """Keep copying for ``drain_grace`` more seconds, then stop following it."""
        follower = self._followers.get(machine_id)
        if follower is None or follower.exited_at is not None:
            return
        follower.exited_at = self._clock.monotonic()
        follower.exit_deadline_ns = int((self._clock.time() + self._grace) * 1e9)

    async def drained(self, machine_id: str) -> None:
        """Return once the machine is no longer followed (its drain ended, or it was never
        followed). Needs ``run()`` to be running."""
        follower = self._followers.get(machine_id)
        if follower is None or follower.dropped:
            return
        if follower.done is None:
            follower.done = anyio.Event()
        await follower.done.wait()

    async def run(self) -> None:
        """The service loop: run it in a task group for as long as the fan-out is used; cancel
        to stop. Starts one poll task per app while that app has followed machines, and stops
        it when it has none."""
        try:
            async with anyio.create_task_group() as tasks:
                while True:
                    self._start_tasks(tasks)
                    # Set by follow() (a new app, a catch-up); nothing can run between making
                    # the event and waiting on it, so no wake-up is lost.
                    self._wake = anyio.Event()
                    await self._wake.wait()
        finally:
            self._wake = None
            self._workers = 0
            for stream in self._streams.values():
                stream.running = False  # a later run() starts them again

    # -- service ----------------------------------------------------------------------------

    def _wake_service(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _start_tasks(self, tasks: TaskGroup) -> None:
        for stream in self._streams.values():
            if not stream.running and stream.followers:
                stream.running = True
                tasks.start_soon(self._poll_app_safely, stream, name=f"logs {stream.app}")
        while self._catch_ups and self._workers < MAX_CATCH_UPS:
            self._workers += 1
            tasks.start_soon(self._catch_up_worker, name="logs catch-up")

    # -- the per-app stream -----------------------------------------------------------------

    async def _poll_app_safely(self, stream: _Stream) -> None:
        # A bug here must not end run() (and with it every stream) or the runs awaiting drains.
        while True:
            try:
                await self._poll_app(stream)
                return
            except Exception:
                logger.exception("log fan-out for app %s failed; restarting it", stream.app)
                await self._clock.sleep(ERROR_MAX_DELAY)

    async def _poll_app(self, stream: _Stream) -> None:
        while True:
            if self._clock.monotonic() >= stream.next_fetch:
                await self._round(stream)
            await self._flush(stream)
            for follower in await self._end_drains(stream):
                await self._copied(follower)
            if not stream.followers:
                # No await since the check: a follow() cannot slip in between.
                stream.running = False
                if self._streams.get(stream.app) is stream:
                    del self._streams[stream.app]
                return
            await self._clock.sleep(self._idle_time(stream))

    def _idle_time(self, stream: _Stream) -> float:
        """Until the next request, or an exited follower's deadline if sooner (at most
        MAX_IDLE, so catch-ups that finished are delivered soon even while the app is down)."""
        now = self._clock.monotonic()
        wake = stream.next_fetch
        for follower in stream.followers.values():
            if follower.exited_at is not None:
                deadline = follower.exited_at + self._grace
                if now < deadline < wake:
                    wake = deadline
        return min(max(0.0, wake - now), MAX_IDLE)

    async def _round(self, stream: _Stream) -> None:
        """Read pages until the present (or MAX_PAGES_PER_ROUND); schedule the next round."""
        started = self._clock.monotonic()
        for _ in range(MAX_PAGES_PER_ROUND):
            token = self._start_token(stream)
            try:
                page = await self._client.get_logs(app=stream.app, next_token=token)
            except BadRequest as exc:
                self._refused(stream, exc)
                if stream.down:
                    return
                continue
            except Exception as exc:  # any failure: the fan-out must outlive it
                self._failed(stream, exc)
                return
            self._recovered(stream)
            advanced = bool(page.next_token) and page.next_token != token
            if page.next_token:
                stream.token = page.next_token
                stream.made_token = False  # the API took our token; its own come next
            self._route(stream, page)
            await self._flush(stream)
            if not page.entries or not advanced:
                stream.caught_up_at = started
                stream.next_fetch = self._clock.monotonic() + self._poll
                return
        stream.next_fetch = self._clock.monotonic()  # more is waiting: go on at once

    def _start_token(self, stream: _Stream) -> str | None:
        if not stream.started:
            stream.started = True
            start = stream.start_since - START_MARGIN
            if self._tokens_refused:
                stream.covers_from = self._clock.time()
            else:
                stream.token, stream.made_token = token_for(start), True
                stream.covers_from = start.timestamp()
        return stream.token

    def _refused(self, stream: _Stream, exc: BadRequest) -> None:
        if stream.made_token:
            # A logs API that does not take a timestamp as a token: page from its default
            # (the newest lines). Earlier lines of current followers are lost.
            logger.info("logs API refused a start token (%s); paging from its default", exc)
            self._tokens_refused = True
        else:
            # It refused a token of its own: keeping it would fail forever.
            self._failed(stream, exc)
        stream.token, stream.made_token = None, False
        stream.covers_from = self._clock.time()

    def _failed(self, stream: _Stream, exc: Exception) -> None:
        stream.errors += 1
        permanent = isinstance(exc, BadRequest | Unauthorized | NotFound)
        if not stream.down and (permanent or stream.errors >= DOWN_AFTER_ERRORS):
            stream.down = True
            logger.warning(
                "logs of app %s unavailable (%s); retrying every %g s, runs go on without them",
                stream.app,
                exc,
                SLOW_RETRY,
            )
        elif not stream.down:
            logger.info("logs of app %s: %s (retrying)", stream.app, exc)
        if stream.down:
            delay = SLOW_RETRY
        else:
            delay = min(ERROR_FIRST_DELAY * 2 ** (stream.errors - 1), ERROR_MAX_DELAY)
        stream.next_fetch = self._clock.monotonic() + delay

    def _recovered(self, stream: _Stream) -> None:
        if stream.down:
            logger.info("logs of app %s available again", stream.app)
        stream.errors, stream.down = 0, False

    def _route(self, stream: _Stream, page: LogsPage) -> None:
        """Hand each entry to its instance's follower, or keep it for one that may come."""
        now, wall = self._clock.monotonic(), self._clock.time()
        held: dict[str, list[LogEntry]] = {}
        for entry in page.entries:
            instance = entry.instance or ""
            if instance in stream.followers:
                held.setdefault(instance, []).append(entry)
            elif instance:  # a line without an instance cannot belong to a followed machine
                stream.buffer.append(_Buffered(now, wall, entry))
                stream.buffered[instance] += 1
        for instance, entries in held.items():
            follower = stream.followers[instance]
            follower.hold(entries)
            if not follower.catching_up:
                stream.dirty.add(instance)
        self._evict(stream, now)

    def _evict(self, stream: _Stream, now: float) -> None:
        buffer = stream.buffer
        while buffer and (len(buffer) > BUFFER_LINES or now - buffer[0].fetched > BUFFER_SECONDS):
            item = buffer.popleft()
            instance = item.entry.instance or ""
            stream.buffered[instance] -= 1
            if stream.buffered[instance] <= 0:
                del stream.buffered[instance]  # many machines come and go: keep no zeros
            stream.evicted_wall = max(stream.evicted_wall or 0.0, item.fetched_wall)

    def _take_buffered(self, stream: _Stream, machine_id: str) -> list[LogEntry]:
        if stream.buffered[machine_id] <= 0:
            return []  # the common case, without scanning the buffer
        del stream.buffered[machine_id]
        mine = [item.entry for item in stream.buffer if item.entry.instance == machine_id]
        stream.buffer = deque(item for item in stream.buffer if item.entry.instance != machine_id)
        return mine

    def _needs_catch_up(self, stream: _Stream, since: datetime) -> bool:
        """Whether lines of a machine followed now may have been read and not kept."""
        if stream.covers_from is None or (since - START_MARGIN).timestamp() < stream.covers_from:
            return True  # the stream started after this machine's window opened
        # The machine's lines were all fetched after `since` (our clock); if the buffer dropped
        # a line fetched that late, it may have been one of them.
        return stream.evicted_wall is not None and stream.evicted_wall >= since.timestamp()

    async def _flush(self, stream: _Stream) -> None:
        """Store and stream the backlog of every follower that has one (and is not held), and
        the lines the masker held back long enough for a continuation that did not come."""
        pending, stream.dirty = stream.dirty, set()
        now = self._clock.monotonic()
        pending.update(m for m, f in stream.followers.items() if f.masking.expired(now))
        for machine_id in pending:
            follower = stream.followers.get(machine_id)
            if follower is None or follower.catching_up:
                continue
            if not follower.backlog and not follower.masking.expired(now):
                continue
            batch, follower.backlog = follower.backlog, []
            if await self._deliver(follower, batch):
                follower.skip_before = None  # the lines held during a catch-up are through
            else:
                # _deliver kept them, in order, for the next flush.
                stream.dirty.add(machine_id)

    async def _end_drains(self, stream: _Stream) -> list[_Follower]:
        """Drop the followers whose drain is over; those whose lines are all stored."""
        now = self._clock.monotonic()
        copied: list[_Follower] = []
        for follower in list(stream.followers.values()):
            if follower.exited_at is None or follower.catching_up:
                continue
            deadline = follower.exited_at + self._grace
            if now >= deadline and self._drain_complete(stream, follower, deadline, now):
                if follower.masking.holding:
                    # The stream ended: no continuation will come for a line held back.
                    await self._deliver(follower, [], release_all=True)
                if not follower.backlog and self._read_to_the_end(stream, follower, deadline):
                    copied.append(follower)
                self._drop(stream, follower)
        return copied

    @staticmethod
    def _read_to_the_end(stream: _Stream, follower: _Follower, deadline: float) -> bool:
        if stream.caught_up_at is not None and stream.caught_up_at >= deadline:
            return True
        position, wall_deadline = stream.position_ns(), follower.exit_deadline_ns
        return position is not None and wall_deadline is not None and position >= wall_deadline

    async def _copied(self, follower: _Follower) -> None:
        if self._on_copied is None:
            return
        try:
            await self._on_copied(follower.run_id, follower.attempt)
        except Exception as exc:  # the ledger is down: someone copies them again later
            logger.warning(
                "could not record that run %s's logs are copied: %s", follower.run_id, exc
            )

    def _drain_complete(
        self, stream: _Stream, follower: _Follower, deadline: float, now: float
    ) -> bool:
        if stream.caught_up_at is not None and stream.caught_up_at >= deadline:
            return True  # a round that began after the deadline read up to the present
        # A busy app may never come back empty: lines stamped past the deadline were read.
        position, wall_deadline = stream.position_ns(), follower.exit_deadline_ns
        if position is not None and wall_deadline is not None and position >= wall_deadline:
            return True
        # Logs cannot be had now: the run must not wait for them.
        return stream.down or (stream.errors > 0 and now >= deadline + FAILING_DRAIN_EXTRA)

    def _drop(self, stream: _Stream, follower: _Follower) -> None:
        if follower.backlog:
            logger.warning(
                "%d log lines of run %s attempt %d could not be stored",
                len(follower.backlog),
                follower.run_id,
                follower.attempt,
            )
        follower.dropped = True
        stream.followers.pop(follower.machine_id, None)
        stream.dirty.discard(follower.machine_id)
        if self._followers.get(follower.machine_id) is follower:
            del self._followers[follower.machine_id]
        if follower.done is not None:
            follower.done.set()

    # -- catch-ups --------------------------------------------------------------------------

    async def _catch_up_worker(self) -> None:
        try:
            while self._catch_ups:
                follower = self._catch_ups.popleft()
                try:
                    await self._catch_up(follower)
                except Exception:
                    logger.exception("log catch-up for machine %s failed", follower.machine_id)
                finally:
                    # Whatever happened, the stream delivers the held lines from here on.
                    follower.catching_up = False
                    stream = self._streams.get(follower.app)
                    if stream is not None and stream.followers.get(follower.machine_id):
                        stream.dirty.add(follower.machine_id)
        finally:
            self._workers -= 1

    async def _catch_up(self, follower: _Follower) -> None:
        """Page this machine's own lines from its ``since`` up to the present."""
        made = not self._tokens_refused
        token = token_for(follower.since - START_MARGIN) if made else None
        errors, delay = 0, ERROR_FIRST_DELAY
        last: datetime | None = None
        while True:
            try:
                page = await self._client.get_logs(
                    app=follower.app, instance=follower.machine_id, next_token=token
                )
                # Defensive: a logs API that ignored the filter must not mix machines' lines.
                mine = [e for e in page.entries if e.instance in (None, follower.machine_id)]
                if mine:
                    if not await self._deliver(follower, mine):
                        raise _StoreFailed
                    last = max(parse_ts(e.timestamp) for e in mine)
            except BadRequest as exc:
                if not made:
                    logger.warning("logs of machine %s unavailable: %s", follower.machine_id, exc)
                    break
                self._tokens_refused = True
                token, made = None, False
                continue
            except (Unauthorized, NotFound) as exc:
                logger.warning("logs of machine %s unavailable: %s", follower.machine_id, exc)
                break
            except (MachinesError, _StoreFailed) as exc:
                errors += 1
                if errors >= MAX_CONSECUTIVE_ERRORS:
                    logger.warning(
                        "log catch-up of machine %s gave up: %r", follower.machine_id, exc
                    )
                    break
                await self._clock.sleep(delay)
                delay = min(delay * 2, ERROR_MAX_DELAY)
                continue
            errors, delay, made = 0, ERROR_FIRST_DELAY, False
            advanced = bool(page.next_token) and page.next_token != token
            token = page.next_token or token
            if not page.entries or not advanced:
                break
        follower.skip_before = last

    # -- delivery ---------------------------------------------------------------------------

    async def _deliver(
        self, follower: _Follower, entries: list[LogEntry], *, release_all: bool = False
    ) -> bool:
        """Mask ``entries``, store the ones the masker lets go in one ``add_logs`` call, then
        stream the ones not streamed yet. A line that may end with the beginning of a secret
        waits in the masker for the next line of its stream (``release_all``: the stream ended).

        False when the store failed: nothing is streamed then, and the lines go back in front
        of the follower's backlog.
        """
        now = self._clock.monotonic()
        ready = follower.masking.feed(entries, now)
        ready += follower.masking.release(now, everything=release_all)
        if not ready:
            return True
        lines = [
            LogLineIn(
                # Without an id, the store derives one from the time, stream and whole text.
                entry_id=e.id or None,
                ts=parse_ts(e.timestamp),
                stream=stream_of(e),
                message=masked,
            )
            for e, masked in ready
        ]
        try:
            await self._add_logs(follower.run_id, follower.attempt, lines)
        except Exception as exc:
            # Warn once per follower: a failing store would otherwise log on every page.
            log = logger.debug if follower.store_warned else logger.warning
            log("storing log lines of run %s failed: %r", follower.run_id, exc)
            follower.store_warned = True
            # Fed again later, the masker gives each the same text (held ones stay held).
            follower.keep_first([e for e, _ in ready])
            return False
        for line in lines:
            key = line.key()
            if key in follower.recent:
                continue  # a page-edge repeat, or a line the catch-up streamed
            if follower.skip_before is not None and line.ts < follower.skip_before:
                continue  # held during the catch-up, which streamed it already
            follower.recent.add(key)
            self._emit(follower, line)
        return True

    def _emit(self, follower: _Follower, line: LogLineIn) -> None:
        event = RunEvent(
            kind="log",
            run_id=follower.run_id,
            attempt=follower.attempt,
            machine_id=follower.machine_id,
            stream=line.stream,
            message=line.message,
            timestamp=line.ts,
        )
        try:
            self._on_event(event)
        except Exception:
            # One caller's broken handler must not stop the stream for every other machine.
            logger.exception("log event handler failed")


class _StoreFailed(Exception):
    """add_logs failed during a catch-up: retried like a failed request."""
