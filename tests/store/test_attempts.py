"""Attempts: one per machine, numbered per run, and the machines unfinished runs still own."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from jobrunner.store import AttemptNotFound, Run, RunNotFound, Store, StoreIntegrityError

RunFactory = Callable[..., Run]


def test_create_attempt_counts_it_on_the_run(store: Store, make_run: RunFactory) -> None:
    run = make_run(max_attempts=3)

    first = store.create_attempt(run.id, 1, submit_id=f"{run.id}.1", region="ams")
    second = store.create_attempt(run.id, 2, submit_id=f"{run.id}.2", region=None)

    assert (first.number, first.state, first.region, first.outcome) == (1, "creating", "ams", None)
    assert first.created_at.tzinfo is not None
    assert second.id != first.id
    assert store.get_run(run.id).attempts == 2
    assert [a.number for a in store.get_attempts(run.id)] == [1, 2]
    assert store.latest_attempt(run.id) == second


def test_create_attempt_clears_the_retry_due_time(store: Store, make_run: RunFactory) -> None:
    run = make_run(max_attempts=2)
    store.create_attempt(run.id, 1, submit_id="s1", region=None)
    store.transition_run(run.id, "pending", next_attempt_at=datetime.now(UTC))

    store.create_attempt(run.id, 2, submit_id="s2", region=None)

    assert store.get_run(run.id).next_attempt_at is None


def test_duplicate_attempt_number_or_submit_id_is_refused(
    store: Store, make_run: RunFactory
) -> None:
    run, other = make_run(), make_run()
    store.create_attempt(run.id, 1, submit_id="tag-1", region=None)

    with pytest.raises(StoreIntegrityError, match="already has attempt 1"):
        store.create_attempt(run.id, 1, submit_id="tag-2", region=None)
    with pytest.raises(StoreIntegrityError, match="tag-1"):
        store.create_attempt(other.id, 1, submit_id="tag-1", region=None)
    assert store.get_run(run.id).attempts == 1
    assert store.get_attempts(other.id) == []


def test_create_attempt_for_an_unknown_run(store: Store) -> None:
    with pytest.raises(RunNotFound):
        store.create_attempt("01ZZZZZZZZZZZZZZZZZZZZZZZZ", 1, submit_id="x", region=None)


def test_update_attempt_sets_fields_and_returns_the_row(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    store.create_attempt(run.id, 1, submit_id="s", region=None)
    finished = datetime.now(UTC)

    updated = store.update_attempt(
        run.id,
        1,
        machine_id="148e21ea0e5de8",
        instance_id="01J0000000000000000000000A",
        region="fra",
        state="finished",
        outcome="oom_killed",
        exit_code=137,
        oom_killed=True,
        signal=9,
        requested_stop=False,
        reason="the job ran out of memory",
        finished_at=finished,
    )

    assert updated.machine_id == "148e21ea0e5de8"
    assert (updated.outcome, updated.exit_code, updated.oom_killed, updated.signal) == (
        "oom_killed",
        137,
        True,
        9,
    )
    assert updated.finished_at == finished
    assert store.latest_attempt(run.id) == updated


def test_update_attempt_errors(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    store.create_attempt(run.id, 1, submit_id="s", region=None)
    with pytest.raises(AttemptNotFound, match="no attempt 2"):
        store.update_attempt(run.id, 2, state="running")
    with pytest.raises(ValueError, match="cannot set submit_id"):
        store.update_attempt(run.id, 1, submit_id="other")
    with pytest.raises(ValueError, match="outcome"):
        store.update_attempt(run.id, 1, outcome="exploded")
    with pytest.raises(ValueError, match="timezone-aware"):
        store.update_attempt(run.id, 1, started_at=datetime(2030, 1, 1))


def test_find_attempt_by_machine(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    store.create_attempt(run.id, 1, submit_id="s", region=None)
    store.update_attempt(run.id, 1, machine_id="m-one")

    found = store.find_attempt_by_machine("m-one")

    assert found is not None and (found.run_id, found.number) == (run.id, 1)
    assert store.find_attempt_by_machine("m-unknown") is None
    assert store.latest_attempt(make_run().id) is None


def test_machine_ids_of_live_runs_excludes_finished_runs(
    store: Store, make_run: RunFactory
) -> None:
    live, finished, no_machine = make_run(max_attempts=2), make_run(), make_run()
    for run, machine in ((live, "m-live-1"), (finished, "m-done")):
        store.create_attempt(run.id, 1, submit_id=f"{run.id}.1", region=None)
        store.update_attempt(run.id, 1, machine_id=machine)
    store.create_attempt(live.id, 2, submit_id=f"{live.id}.2", region=None)
    store.update_attempt(live.id, 2, machine_id="m-live-2")
    store.create_attempt(no_machine.id, 1, submit_id=f"{no_machine.id}.1", region=None)
    store.finish_run(finished.id, "succeeded", exit_code=0)

    assert store.machine_ids_of_live_runs() == {"m-live-1", "m-live-2"}
