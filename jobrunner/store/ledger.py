"""The async seam between the run engine and its ledger.

The runner, the worker and the Python API speak to a :class:`Ledger`: an async interface whose
methods mean the same on every implementation and raise the same errors (``RunNotFound``,
``StoreIntegrityError``, ...). Two implementations ship:

* :class:`SqlLedger`, the real one: the synchronous :class:`~jobrunner.store.Store` (SQLite or
  PostgreSQL) called from a small pool of threads, because SQLite has no async driver and one
  SQL code path for both databases beats two;
* ``jobrunner.testing.MemoryLedger``, in memory, for users' own tests and ours.

One contract test suite (``tests/store/test_ledger_contract.py``) runs against all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any, ParamSpec, Protocol, TypeVar

import anyio
import anyio.to_thread

from jobrunner.store.records import Attempt, LogLine, LogLineIn, Run, Transition
from jobrunner.store.store import DEFAULT_IDEMPOTENCY_WINDOW, RunRequest, Store

__all__ = ["Ledger", "SqlLedger"]

P = ParamSpec("P")
T = TypeVar("T")

# SQLite serialises writers anyway and PostgreSQL's pool is small: more threads only queue.
STORE_THREADS = 8


class Ledger(Protocol):
    """What the run engine needs from a ledger. Every method is one transaction."""

    async def create_run(
        self,
        *,
        job_name: str,
        job_snapshot: dict[str, Any],
        backend: str,
        app: str | None,
        region: str | None,
        max_attempts: int,
        timeout_s: float | None,
        trigger: str = "cli",
        owner: str | None = None,
        owner_ttl_s: float = 30.0,
    ) -> Run:
        """A new ``pending`` run outside any queue, optionally born claimed by ``owner``."""
        ...

    async def enqueue_runs(
        self,
        requests: Sequence[RunRequest],
        *,
        idempotency_window: timedelta = DEFAULT_IDEMPOTENCY_WINDOW,
    ) -> list[tuple[Run, bool]]:
        """Queued runs, in one transaction: ``(run, created)`` each (idempotency keys honoured)."""
        ...

    async def get_run(self, run_id_or_prefix: str) -> Run:
        """Raises RunNotFound, AmbiguousRunId or InvalidRunId."""
        ...

    async def list_runs(
        self,
        *,
        job: str | None = None,
        state: str | Sequence[str] | None = None,
        limit: int | None = 50,
    ) -> list[Run]: ...

    async def list_unfinished_runs(self, *, limit: int | None = None) -> list[Run]: ...

    async def transition_run(
        self,
        run_id: str,
        to_state: str,
        *,
        reason: str | None = None,
        from_states: Collection[str] | None = None,
        attempt_number: int | None = None,
        **fields: Any,
    ) -> bool:
        """False (writing nothing) when the run is not in ``from_states``."""
        ...

    async def finish_run(
        self, run_id: str, outcome: str, *, exit_code: int | None = None, reason: str | None = None
    ) -> bool:
        """True only for the one call that recorded the outcome."""
        ...

    async def transitions(self, run_id: str) -> list[Transition]: ...

    async def request_cancel(self, run_id: str) -> bool: ...

    async def create_attempt(
        self, run_id: str, number: int, *, submit_id: str, region: str | None
    ) -> Attempt: ...

    async def update_attempt(self, run_id: str, number: int, **fields: Any) -> Attempt: ...

    async def begin_attempt(
        self,
        run_id: str,
        number: int,
        *,
        submit_id: str,
        region: str | None,
        reason: str = "creating machine",
    ) -> Attempt:
        """A new attempt and the run's move to ``creating``, together."""
        ...

    async def advance_attempt(
        self,
        run_id: str,
        number: int,
        *,
        to_state: str,
        reason: str,
        from_states: Collection[str] | None = None,
        run_fields: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Attempt:
        """Attempt fields and the run's move to ``to_state``, together."""
        ...

    async def end_attempt(
        self,
        run_id: str,
        number: int,
        *,
        owner: str,
        outcome: str | None = None,
        exit_code: int | None = None,
        reason: str | None = None,
        requeue_at: datetime | None = None,
        requeue_reason: str | None = None,
        attempt_fields: Mapping[str, Any],
    ) -> Run:
        """How an attempt ended, the run's outcome or requeue, and the claim let go, together."""
        ...

    async def get_attempts(self, run_id: str) -> list[Attempt]: ...

    async def latest_attempt(self, run_id: str) -> Attempt | None: ...

    async def machine_ids_of_live_runs(self) -> set[str]: ...

    async def attempts_missing_logs(
        self, *, backend: str, finished_before: datetime, since: datetime, limit: int
    ) -> list[Attempt]:
        """Finished attempts whose last log lines may never have been copied."""
        ...

    async def claim_run(self, run_id: str, owner: str, ttl_s: float) -> bool: ...

    async def takeover_claim(
        self, run_id: str, expected_owner: str | None, owner: str, ttl_s: float
    ) -> bool: ...

    async def renew_claims(self, owner: str, ttl_s: float) -> set[str]:
        """Renew all of ``owner``'s claims at once; the ids it still holds."""
        ...

    async def cancel_requests(self, owner: str) -> set[str]: ...

    async def release_claim(self, run_id: str, owner: str) -> None: ...

    async def claim_due(
        self,
        owner: str,
        *,
        backend: str,
        queues: Sequence[str],
        limit: int,
        ttl_s: float,
        queue_limits: Mapping[str, int] | None = None,
    ) -> list[Run]: ...

    async def claim_orphans(
        self, owner: str, *, backend: str, limit: int, ttl_s: float, dead_owners: Collection[str]
    ) -> list[Run]: ...

    async def claim_owners(self, backend: str) -> set[str]: ...

    async def requeue_run(
        self,
        run_id: str,
        owner: str,
        *,
        next_attempt_at: datetime,
        reason: str,
        attempt_number: int,
    ) -> bool: ...

    async def retry_run(self, run_id: str, *, extra_attempts: int) -> Run: ...

    async def add_logs(
        self, run_id: str, attempt_number: int, lines: Iterable[LogLineIn]
    ) -> int: ...

    async def get_logs(
        self, run_id: str, *, after_id: int = 0, limit: int | None = None
    ) -> list[LogLine]: ...

    async def queue_stats(self) -> list[dict[str, Any]]: ...

    async def take_rate_token(self, key: str, rate: float, burst: int) -> float:
        """Seconds to wait before one more call against the shared bucket ``key``."""
        ...

    async def put_blob(self, data: bytes) -> str:
        """Store ``data`` once in the content-addressed blob store; its sha256 (hex)."""
        ...

    async def get_blob(self, sha256: str) -> bytes:
        """The bytes stored under ``sha256``; raises BlobNotFound.

        ``create_run`` and ``enqueue_runs`` store the blobs a ``Job.snapshot()`` carries (its
        large files) before the run that refers to them, so a run's files are always there."""
        ...


class SqlLedger:
    """The :class:`Ledger` over a SQL :class:`Store`, each call in one of a few threads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._limiter = anyio.CapacityLimiter(STORE_THREADS)

    def __repr__(self) -> str:
        return f"SqlLedger({self.store!r})"

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=self._limiter)

    async def create_run(self, **kwargs: Any) -> Run:
        return await self._call(self.store.create_run, **kwargs)

    async def enqueue_runs(
        self,
        requests: Sequence[RunRequest],
        *,
        idempotency_window: timedelta = DEFAULT_IDEMPOTENCY_WINDOW,
    ) -> list[tuple[Run, bool]]:
        return await self._call(
            self.store.enqueue_runs, requests, idempotency_window=idempotency_window
        )

    async def get_run(self, run_id_or_prefix: str) -> Run:
        return await self._call(self.store.get_run, run_id_or_prefix)

    async def list_runs(self, **kwargs: Any) -> list[Run]:
        return await self._call(self.store.list_runs, **kwargs)

    async def list_unfinished_runs(self, *, limit: int | None = None) -> list[Run]:
        return await self._call(self.store.list_unfinished_runs, limit=limit)

    async def transition_run(self, run_id: str, to_state: str, **kwargs: Any) -> bool:
        return await self._call(self.store.transition_run, run_id, to_state, **kwargs)

    async def finish_run(self, run_id: str, outcome: str, **kwargs: Any) -> bool:
        return await self._call(self.store.finish_run, run_id, outcome, **kwargs)

    async def transitions(self, run_id: str) -> list[Transition]:
        return await self._call(self.store.transitions, run_id)

    async def request_cancel(self, run_id: str) -> bool:
        return await self._call(self.store.request_cancel, run_id)

    async def create_attempt(
        self, run_id: str, number: int, *, submit_id: str, region: str | None
    ) -> Attempt:
        return await self._call(
            self.store.create_attempt, run_id, number, submit_id=submit_id, region=region
        )

    async def update_attempt(self, run_id: str, number: int, **fields: Any) -> Attempt:
        return await self._call(self.store.update_attempt, run_id, number, **fields)

    async def begin_attempt(self, run_id: str, number: int, **kwargs: Any) -> Attempt:
        return await self._call(self.store.begin_attempt, run_id, number, **kwargs)

    async def advance_attempt(self, run_id: str, number: int, **kwargs: Any) -> Attempt:
        return await self._call(self.store.advance_attempt, run_id, number, **kwargs)

    async def end_attempt(self, run_id: str, number: int, **kwargs: Any) -> Run:
        return await self._call(self.store.end_attempt, run_id, number, **kwargs)

    async def get_attempts(self, run_id: str) -> list[Attempt]:
        return await self._call(self.store.get_attempts, run_id)

    async def latest_attempt(self, run_id: str) -> Attempt | None:
        return await self._call(self.store.latest_attempt, run_id)

    async def machine_ids_of_live_runs(self) -> set[str]:
        return await self._call(self.store.machine_ids_of_live_runs)

    async def attempts_missing_logs(
        self, *, backend: str, finished_before: datetime, since: datetime, limit: int
    ) -> list[Attempt]:
        return await self._call(
            self.store.attempts_missing_logs,
            backend=backend,
            finished_before=finished_before,
            since=since,
            limit=limit,
        )

    async def claim_run(self, run_id: str, owner: str, ttl_s: float) -> bool:
        return await self._call(self.store.claim_run, run_id, owner, ttl_s)

    async def takeover_claim(
        self, run_id: str, expected_owner: str | None, owner: str, ttl_s: float
    ) -> bool:
        return await self._call(self.store.takeover_claim, run_id, expected_owner, owner, ttl_s)

    async def renew_claims(self, owner: str, ttl_s: float) -> set[str]:
        return await self._call(self.store.renew_claims, owner, ttl_s)

    async def cancel_requests(self, owner: str) -> set[str]:
        return await self._call(self.store.cancel_requests, owner)

    async def release_claim(self, run_id: str, owner: str) -> None:
        await self._call(self.store.release_claim, run_id, owner)

    async def claim_due(self, owner: str, **kwargs: Any) -> list[Run]:
        return await self._call(self.store.claim_due, owner, **kwargs)

    async def claim_orphans(self, owner: str, **kwargs: Any) -> list[Run]:
        return await self._call(self.store.claim_orphans, owner, **kwargs)

    async def claim_owners(self, backend: str) -> set[str]:
        return await self._call(self.store.claim_owners, backend)

    async def requeue_run(self, run_id: str, owner: str, **kwargs: Any) -> bool:
        return await self._call(self.store.requeue_run, run_id, owner, **kwargs)

    async def retry_run(self, run_id: str, *, extra_attempts: int) -> Run:
        return await self._call(self.store.retry_run, run_id, extra_attempts=extra_attempts)

    async def add_logs(self, run_id: str, attempt_number: int, lines: Iterable[LogLineIn]) -> int:
        return await self._call(self.store.add_logs, run_id, attempt_number, list(lines))

    async def get_logs(
        self, run_id: str, *, after_id: int = 0, limit: int | None = None
    ) -> list[LogLine]:
        return await self._call(self.store.get_logs, run_id, after_id=after_id, limit=limit)

    async def queue_stats(self) -> list[dict[str, Any]]:
        return await self._call(self.store.queue_stats)

    async def take_rate_token(self, key: str, rate: float, burst: int) -> float:
        return await self._call(self.store.take_rate_token, key, rate, burst)

    async def put_blob(self, data: bytes) -> str:
        return await self._call(self.store.put_blob, data)

    async def get_blob(self, sha256: str) -> bytes:
        # Handed over in a list that is emptied here: the pool's thread keeps a reference to
        # the last result it returned, which would keep a large file alive for as long.
        box = await self._call(lambda: [self.store.get_blob(sha256)])
        return box.pop()


def _conforms(store: Store) -> Ledger:
    # mypy checks here that SqlLedger keeps the Ledger protocol.
    return SqlLedger(store)
