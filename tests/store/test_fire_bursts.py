"""Recording a scheduler burst (``Store.prepare_fires`` / ``record_fires``) on SQLite and
PostgreSQL: the rows it writes below SQLAlchemy (store/bulk.py) read back like any others."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from jobrunner.store import FireDecision, RunRequest, Store

TICK = datetime(2027, 1, 4, 9, 0, tzinfo=UTC)


def request(name: str, **overrides: object) -> RunRequest:
    values: dict[str, object] = {
        "job_name": name,
        "job_snapshot": {"name": name, "cmd": ["echo", 'é ✓ "quoted"'], "env": {"A": "1"}},
        "backend": "local",
        "app": "jobrunner-local",
        "region": None,
        "max_attempts": 3,
        "timeout_s": 12.5,
        "trigger": "schedule",
        "queue": "default",
    }
    values.update(overrides)
    return RunRequest(**values)  # type: ignore[arg-type]


def burst(names: list[str], tick: datetime = TICK) -> list[FireDecision]:
    out = [FireDecision(n, tick, "fired", None, "cron", request(n)) for n in names]
    out.append(FireDecision("skipper", tick, "skipped", "paused: paused by hand"))
    return out


def test_a_prepared_burst_reads_back_like_any_other_run(store: Store) -> None:
    names = [f"job-{i}" for i in range(1_205)]  # more than one transaction's worth
    store.ensure_schedules([*names, "skipper"], since=TICK - timedelta(minutes=1))
    decisions = burst(names)
    jittered = FireDecision(
        "jittered", TICK, "fired", None, "cron", request("jittered", run_at=TICK + timedelta(7))
    )
    fires = store.record_fires(
        store.prepare_fires([*decisions, jittered]),
        decided_until=dict.fromkeys([*names, "skipper"], TICK),
    )
    assert len(fires) == len(names) + 2
    by_schedule = {f.schedule: f for f in fires}
    assert by_schedule["skipper"].run_id is None and by_schedule["skipper"].decision == "skipped"
    run = store.get_run(by_schedule["job-7"].run_id or "")
    assert run.job_snapshot == request("job-7").job_snapshot
    assert (run.state, run.queue, run.trigger, run.max_attempts) == (
        "pending",
        "default",
        "schedule",
        3,
    )
    assert run.timeout_s == 12.5 and run.created_at == run.updated_at
    assert abs(datetime.now(UTC) - run.created_at) < timedelta(minutes=5)  # stamped when written
    assert [t.reason for t in store.transitions(run.id)] == ["enqueued on default"]
    later = store.get_run(by_schedule["jittered"].run_id or "")
    assert later.next_attempt_at == TICK + timedelta(7)
    assert store.schedule_states(["job-0"])["job-0"].decided_until == TICK
    stored = store.list_fires("job-3")
    assert [(f.scheduled_for, f.run_id) for f in stored] == [(TICK, by_schedule["job-3"].run_id)]


def test_a_burst_decided_by_another_scheduler_first_adds_nothing(store: Store) -> None:
    names = [f"job-{i}" for i in range(50)]
    store.ensure_schedules(names, since=TICK - timedelta(minutes=1))
    first = store.record_fires(store.prepare_fires(burst(names[:30])), decided_until={})
    second = store.record_fires(store.prepare_fires(burst(names)), decided_until={})
    # Only the 20 ticks the first scheduler had not decided are the second's.
    assert len(first) == 31 and len(second) == 20
    assert {f.schedule for f in second} == set(names[30:])
    runs = store.list_runs(limit=1_000)
    assert len(runs) == 50  # the second scheduler's runs of the first 30 ticks are gone
    linked = {f.run_id for f in first + second if f.run_id}
    assert {r.id for r in runs} == linked
