"""Runs: creating, finding by id or prefix, listing, state transitions, finishing exactly once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from jobrunner.store import AmbiguousRunId, InvalidRunId, Run, RunNotFound, Store
from jobrunner.store import store as store_module

RunFactory = Callable[..., Run]


def test_create_run_records_a_pending_run_with_aware_utc_timestamps(
    store: Store, make_run: RunFactory
) -> None:
    snapshot = {"name": "hello", "env": {"GREETING": "hi"}, "files": [{"raw_value": "aGk="}]}
    run = make_run(job_snapshot=snapshot, max_attempts=3, timeout_s=90.0, trigger="python")

    fetched = store.get_run(run.id)

    assert fetched == run
    assert fetched.state == "pending"
    assert fetched.job_snapshot == snapshot
    assert (fetched.attempts, fetched.max_attempts, fetched.timeout_s) == (0, 3, 90.0)
    assert fetched.trigger == "python"
    assert fetched.created_at.tzinfo is not None
    assert fetched.created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - fetched.created_at) < timedelta(seconds=30)
    assert len(run.id) == 26
    assert run.short_id == run.id[:12]


def test_create_run_rejects_an_unknown_backend(store: Store, make_run: RunFactory) -> None:
    with pytest.raises(ValueError, match="backend"):
        make_run(backend="kubernetes")


def test_get_run_by_unique_prefix_in_any_case(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    assert store.get_run(run.id[:6].lower()).id == run.id
    assert store.get_run(run.id[:12]).id == run.id


def test_get_run_unknown_id_names_it_and_suggests_runs_list(store: Store) -> None:
    with pytest.raises(RunNotFound) as caught:
        store.get_run("01ZZZZZZZZZZZZZZZZZZZZZZZZ")
    assert "01ZZZZZZZZZZZZZZZZZZZZZZZZ" in str(caught.value)
    assert "jobrunner runs list" in str(caught.value)


def test_get_run_prefix_too_short_or_with_foreign_characters(store: Store) -> None:
    with pytest.raises(InvalidRunId, match="at least 6"):
        store.get_run("01AB")
    with pytest.raises(RunNotFound):
        store.get_run("not-an-id!")


def test_get_run_ambiguous_prefix_lists_the_matches(
    store: Store, make_run: RunFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = iter(["01HX0000000000000000000001", "01HX0000000000000000000002"])
    monkeypatch.setattr(store_module, "new_run_id", lambda: next(ids))
    first, second = make_run(), make_run()

    with pytest.raises(AmbiguousRunId) as caught:
        store.get_run("01hx0000")

    assert first.id in str(caught.value) and second.id in str(caught.value)
    assert store.get_run(second.id).id == second.id


def test_list_runs_newest_first_with_filters_and_limit(store: Store, make_run: RunFactory) -> None:
    hello_old = make_run(job_name="hello")
    report = make_run(job_name="report")
    hello_new = make_run(job_name="hello")
    store.finish_run(hello_new.id, "failed", exit_code=3)

    assert [r.id for r in store.list_runs()] == [hello_new.id, report.id, hello_old.id]
    assert [r.id for r in store.list_runs(job="hello")] == [hello_new.id, hello_old.id]
    assert [r.id for r in store.list_runs(state="failed")] == [hello_new.id]
    assert [r.id for r in store.list_runs(state=["pending"], job="hello")] == [hello_old.id]
    assert [r.id for r in store.list_runs(limit=1)] == [hello_new.id]
    with pytest.raises(ValueError, match="unknown run state"):
        store.list_runs(state="exploded")


def test_list_unfinished_runs_oldest_first(store: Store, make_run: RunFactory) -> None:
    first, done, running = make_run(), make_run(), make_run()
    store.finish_run(done.id, "succeeded", exit_code=0)
    store.transition_run(running.id, "running")

    assert [r.id for r in store.list_unfinished_runs()] == [first.id, running.id]


def test_transitions_are_recorded_with_times_reasons_and_attempts(
    store: Store, make_run: RunFactory
) -> None:
    run = make_run()
    assert store.transition_run(run.id, "creating", reason="creating machine", attempt_number=1)
    assert store.transition_run(run.id, "starting", attempt_number=1)
    assert store.transition_run(run.id, "running", reason="machine started", attempt_number=1)
    assert store.finish_run(run.id, "succeeded", exit_code=0, reason="exit code 0")

    history = store.transitions(run.id)
    assert [(t.from_state, t.to_state) for t in history] == [
        (None, "pending"),
        ("pending", "creating"),
        ("creating", "starting"),
        ("starting", "running"),
        ("running", "succeeded"),
    ]
    assert [t.attempt_number for t in history[1:4]] == [1, 1, 1]
    assert history[3].reason == "machine started"
    assert all(t.at.tzinfo is not None for t in history)
    assert [t.at for t in history] == sorted(t.at for t in history)

    final = store.get_run(run.id)
    assert final.state == "succeeded" and final.exit_code == 0 and final.reason == "exit code 0"
    assert final.started_at == history[3].at
    assert final.finished_at == history[4].at
    assert final.duration_s == pytest.approx((final.finished_at - final.started_at).total_seconds())


def test_transition_from_the_wrong_state_writes_nothing(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    before = store.get_run(run.id)

    assert not store.transition_run(run.id, "running", from_states={"starting"})

    assert store.get_run(run.id) == before
    assert len(store.transitions(run.id)) == 1


def test_a_finished_run_is_never_reopened_by_default(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    store.finish_run(run.id, "cancelled", reason="cancelled by the user")

    assert not store.transition_run(run.id, "running")
    assert store.get_run(run.id).state == "cancelled"


def test_transition_sets_extra_fields_and_keeps_the_first_start_time(
    store: Store, make_run: RunFactory
) -> None:
    run = make_run(max_attempts=2)
    store.transition_run(run.id, "running")
    first_start = store.get_run(run.id).started_at
    due = datetime.now(UTC) + timedelta(seconds=10)

    assert store.transition_run(run.id, "pending", reason="retrying", next_attempt_at=due)
    assert store.get_run(run.id).next_attempt_at == due
    store.transition_run(run.id, "running")

    again = store.get_run(run.id)
    assert again.started_at == first_start
    store.finish_run(again.id, "failed", exit_code=1)
    assert store.get_run(run.id).next_attempt_at is None


def test_transition_argument_errors(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    with pytest.raises(ValueError, match="unknown run state"):
        store.transition_run(run.id, "exploded")
    with pytest.raises(ValueError, match="cannot set"):
        store.transition_run(run.id, "running", state="running")
    with pytest.raises(ValueError, match="timezone-aware"):
        store.transition_run(run.id, "pending", next_attempt_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="outcome"):
        store.finish_run(run.id, "running")
    with pytest.raises(RunNotFound):
        store.transition_run("01ZZZZZZZZZZZZZZZZZZZZZZZZ", "running")


def test_finish_run_only_once(store: Store, make_run: RunFactory) -> None:
    run = make_run()
    assert store.finish_run(run.id, "failed", exit_code=3, reason="exit code 3")
    assert not store.finish_run(run.id, "succeeded", exit_code=0)

    final = store.get_run(run.id)
    assert (final.state, final.exit_code, final.reason) == ("failed", 3, "exit code 3")
    assert [t.to_state for t in store.transitions(run.id)] == ["pending", "failed"]


def test_finish_run_race_between_threads_has_one_winner(store: Store, make_run: RunFactory) -> None:
    for _ in range(5):
        run = make_run()
        store.transition_run(run.id, "running")
        barrier = threading.Barrier(2)
        results: dict[str, bool] = {}

        def finish(
            outcome: str,
            run_id: str = run.id,
            barrier: threading.Barrier = barrier,
            results: dict[str, bool] = results,
        ) -> None:
            barrier.wait()
            results[outcome] = store.finish_run(run_id, outcome)

        threads = [threading.Thread(target=finish, args=(o,)) for o in ("succeeded", "cancelled")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)

        assert sorted(results.values()) == [False, True]
        winner = next(outcome for outcome, won in results.items() if won)
        assert store.get_run(run.id).state == winner
        terminal = [t for t in store.transitions(run.id) if t.to_state in Store.TERMINAL_STATES]
        assert [t.to_state for t in terminal] == [winner]


def test_request_cancel_flags_only_unfinished_runs(store: Store, make_run: RunFactory) -> None:
    active, finished = make_run(), make_run()
    store.finish_run(finished.id, "succeeded", exit_code=0)

    assert store.request_cancel(active.id)
    assert store.get_run(active.id).cancel_requested
    assert not store.request_cancel(finished.id)
    assert not store.get_run(finished.id).cancel_requested
    with pytest.raises(RunNotFound):
        store.request_cancel("01ZZZZZZZZZZZZZZZZZZZZZZZZ")


def test_records_stay_usable_after_the_store_is_closed(database_url: str) -> None:
    with Store(database_url) as store:
        run = store.create_run(
            job_name="hello",
            job_snapshot={"name": "hello"},
            backend="fly",
            app="my-app",
            region="ams",
            max_attempts=1,
            timeout_s=None,
        )
        listed = store.list_runs()
    assert listed[0].job_snapshot["name"] == "hello"
    assert run.region == "ams" and run.duration_s is None and not run.is_finished
