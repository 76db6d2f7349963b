"""Claims: one driver per run, expiring, renewable, and raced fairly across processes."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier

from jobrunner.store import Run, Store

RunFactory = Callable[..., Run]


def test_claim_renew_release(store: Store, make_run: RunFactory) -> None:
    run = make_run()

    assert store.claim_run(run.id, "host:1", 30)
    claimed = store.get_run(run.id)
    assert claimed.owner == "host:1"
    assert claimed.owner_expires_at is not None
    assert claimed.owner_expires_at > datetime.now(UTC) + timedelta(seconds=20)
    assert store.claim_run(run.id, "host:1", 30), "the owner may claim again"
    assert not store.claim_run(run.id, "host:2", 30)

    assert store.renew_claim(run.id, "host:1", 60)
    assert store.get_run(run.id).owner_expires_at > claimed.owner_expires_at  # type: ignore[operator]
    assert not store.renew_claim(run.id, "host:2", 60)

    store.release_claim(run.id, "host:2")
    assert store.get_run(run.id).owner == "host:1", "only the owner releases"
    store.release_claim(run.id, "host:1")
    released = store.get_run(run.id)
    assert released.owner is None and released.owner_expires_at is None
    assert store.claim_run(run.id, "host:2", 30)


def test_an_expired_claim_can_be_taken(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    assert store.claim_run(run.id, "dead:1", 0.05)
    time.sleep(0.1)

    assert store.claim_run(run.id, "alive:2", 30)
    assert store.get_run(run.id).owner == "alive:2"
    assert not store.renew_claim(run.id, "dead:1", 30)


def test_finished_runs_cannot_be_claimed(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    store.finish_run(run.id, "succeeded", exit_code=0)
    assert not store.claim_run(run.id, "host:1", 30)
    assert not store.takeover_claim(run.id, None, "host:1", 30)


def test_takeover_only_from_the_expected_owner(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    store.claim_run(run.id, "dead:1", 30)

    assert not store.takeover_claim(run.id, "someone-else", "new:2", 30)
    assert store.takeover_claim(run.id, "dead:1", "new:2", 30)
    assert store.get_run(run.id).owner == "new:2"
    assert not store.takeover_claim(run.id, "dead:1", "new:3", 30)


def _claim_in_child(url: str, run_id: str, owner: str, barrier: Barrier, out: Connection) -> None:
    # A child process: open its own Store; never touch inherited connections, and leave with
    # os._exit so that inherited connections are not closed (that would break the parent's).
    code = 0
    try:
        store = Store(url)
        barrier.wait(timeout=20)
        out.send(store.claim_run(run_id, owner, 30))
        store.close()
    except BaseException as exc:
        out.send(repr(exc))
        code = 1
    finally:
        os._exit(code)


def test_claim_race_between_processes_has_one_winner(
    store: Store, make_run: RunFactory, database_url: str
) -> None:
    # "spawn", not "fork": the test process has threads by now, and a forked child can inherit
    # a lock one of them held.
    context = multiprocessing.get_context("spawn")
    for _ in range(3):
        run = make_run()
        barrier = context.Barrier(2)
        pipes = [context.Pipe(duplex=False) for _ in range(2)]
        children = [
            context.Process(
                target=_claim_in_child,
                args=(database_url, run.id, f"proc:{n}", barrier, pipes[n][1]),
            )
            for n in range(2)
        ]
        for child in children:
            child.start()
        results = []
        for receiver, _sender in pipes:
            assert receiver.poll(30), "a child did not report"
            results.append(receiver.recv())
        for child in children:
            child.join(timeout=30)

        assert sorted(results, key=str) == [False, True], results
        winner = f"proc:{results.index(True)}"
        assert store.get_run(run.id).owner == winner
