"""Job file contents stored once (the ``blobs`` table), on SQLite and PostgreSQL: however many
runs a job with a large file has, the ledger holds its bytes once; pruning runs removes the
bytes no run uses any more; ledgers from before the blob store are moved over by migration 0004.
"""

from __future__ import annotations

import base64
import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from alembic import command

from jobrunner.spec import Job
from jobrunner.store import FireDecision, RunRequest, Store
from jobrunner.store.engine import create_store_engine
from jobrunner.store.migrate import alembic_config

MIB = 1024 * 1024
TICK = datetime(2027, 1, 4, 9, 0, tzinfo=UTC)


def big_job(tmp_path: Path, data: bytes, name: str = "big") -> Job:
    (tmp_path / f"{name}.bin").write_bytes(data)
    return Job.parse(
        {
            "name": name,
            "image": "alpine",
            "cmd": ["sha256sum", "/srv/big.bin"],
            "files": [{"guest_path": "/srv/big.bin", "source": f"{name}.bin"}],
        },
        source_path=tmp_path / f"{name}.toml",
    )


def request(job: Job, snapshot: dict[str, object] | None = None, **extra: object) -> RunRequest:
    return RunRequest(
        job_name=job.name,
        job_snapshot=job.snapshot() if snapshot is None else snapshot,
        backend="local",
        app="jobrunner-local",
        region=None,
        max_attempts=1,
        timeout_s=None,
        **extra,  # type: ignore[arg-type]
    )


def create(store: Store, job: Job) -> None:
    store.create_run(
        job_name=job.name,
        job_snapshot=job.snapshot(),
        backend="local",
        app="jobrunner-local",
        region=None,
        max_attempts=1,
        timeout_s=None,
    )


def ledger_bytes(store: Store, url: str) -> int:
    """The ledger's size on disk: the SQLite file (and WAL), or the PostgreSQL database."""
    if store.dialect == "sqlite":
        path = Path(sa.make_url(url).database or "")
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    engine = create_store_engine(url)
    try:
        with engine.connect() as db:
            return int(db.execute(sa.text("SELECT pg_database_size(current_database())")).scalar())
    finally:
        engine.dispose()


def test_many_runs_of_a_large_file_job_store_its_bytes_once(
    store: Store, database_url: str, tmp_path: Path
) -> None:
    data = os.urandom(2 * MIB)  # random: nothing compresses it
    job = big_job(tmp_path, data)
    snapshot = job.snapshot()
    assert len(str(dict(snapshot))) < 2_000  # the snapshot refers to the file, holds no bytes
    create(store, job)
    before = ledger_bytes(store, database_url)

    for _ in range(10):  # `jobrunner run` ten times: a new snapshot each time, the same file
        create(store, job)
    store.enqueue_runs([request(job, snapshot, queue="default") for _ in range(20)])

    assert store.blob_usage() == (1, len(data))
    grown = ledger_bytes(store, database_url) - before
    assert grown < len(data) // 2, f"31 runs grew the ledger by {grown} bytes"
    [digest] = snapshot.blobs
    assert store.get_blob(digest) == data
    run = store.list_runs(limit=1)[0]
    assert Job.from_snapshot(run.job_snapshot).blob_digests() == [digest]


def test_a_schedule_burst_writes_its_blob_once(store: Store, tmp_path: Path) -> None:
    data = os.urandom(MIB)
    job = big_job(tmp_path, data)
    shared = job.snapshot()  # the scheduler computes a schedule's snapshot once
    names = [f"s{i}" for i in range(30)]
    store.ensure_schedules(names, since=TICK - timedelta(minutes=1))
    decisions = [
        FireDecision(n, TICK, "fired", None, "cron", request(job, shared, queue="default"))
        for n in names
    ]
    writes: list[str] = []

    def counted(load: object) -> object:
        def wrapper() -> bytes:
            writes.append("read")
            return load()  # type: ignore[operator]

        return wrapper

    shared.blobs = {d: counted(f) for d, f in shared.blobs.items()}  # type: ignore[misc]
    fires = store.record_fires(store.prepare_fires(decisions), decided_until={})
    assert len(fires) == 30 and writes == ["read"]  # the bytes were read (and written) once
    again = [
        FireDecision(n, TICK + timedelta(minutes=1), "fired", None, "cron", d.run)
        for n, d in zip(names, decisions, strict=True)
    ]
    store.record_fires(again, decided_until={})
    assert writes == ["read"]  # already stored: not even read again
    assert store.blob_usage() == (1, len(data))
    run = store.get_run(fires[0].run_id or "")
    rebuilt = Job.from_snapshot(run.job_snapshot)
    blobs = {d: store.get_blob(d) for d in rebuilt.blob_digests()}
    config = rebuilt.to_machine_config(environ={}, metadata={}, blobs=blobs)
    assert config.files and base64.b64decode(config.files[0].raw_value or "") == data


def test_pruning_runs_removes_the_blobs_no_run_uses(store: Store, tmp_path: Path) -> None:
    old, new = os.urandom(100_000), os.urandom(100_000)
    old_job, new_job = big_job(tmp_path, old, "old"), big_job(tmp_path, new, "new")
    store.ensure_schedules(["nightly"], since=TICK - timedelta(days=1))
    jobs = [old_job, old_job, new_job]  # the job file changed before the third night
    for day, job in enumerate(jobs):
        decision = FireDecision(
            "nightly", TICK + timedelta(days=day), "fired", None, "cron", request(job)
        )
        [fire] = store.record_fires([decision], decided_until={})
        assert store.finish_run(fire.run_id or "", "succeeded")
    assert store.blob_usage() == (2, 200_000)

    assert store.prune_schedule_runs("nightly", keep=2) == 1
    assert store.blob_usage() == (2, 200_000)  # the second night still uses the old file
    assert store.prune_schedule_runs("nightly", keep=1) == 1
    assert store.blob_usage() == (1, 100_000)
    assert store.get_blob(hashlib.sha256(new).hexdigest()) == new


V3_RUNS = sa.table(
    "runs",
    *(sa.column(c) for c in ("id", "job_name", "backend", "app", "state", "trigger")),
    *(sa.column(c) for c in ("attempts", "max_attempts", "cancel_requested", "priority")),
    sa.column("job_snapshot", sa.JSON()),
    *(sa.column(c, sa.DateTime(timezone=True)) for c in ("created_at", "updated_at")),
)


def test_migration_moves_inline_files_of_old_snapshots_into_blobs(
    database_url: str, tmp_path: Path
) -> None:
    # A ledger of the version before the blob store: two runs of a job with a large source file
    # and a large content file, inline (base64 raw_value, text content), and a small one.
    data = os.urandom(300_000)
    text = "line of text\n" * 3_000
    old_snapshot = {
        "name": "legacy",
        "image": "alpine",
        "cmd": ["sh", "-c", "sha256sum /srv/a.bin /etc/b.txt"],
        "files": [
            {
                "guest_path": "/srv/a.bin",
                "source": "a.bin",
                "raw_value": base64.b64encode(data).decode(),
            },
            {"guest_path": "/etc/b.txt", "content": text, "mode": 0o600},
            {"guest_path": "/etc/small", "content": "tiny"},
        ],
        "format": 1,
        "source_path": str(tmp_path / "legacy.toml"),
    }
    at = datetime(2026, 11, 1, tzinfo=UTC)
    ids = ["01JGZZZZZZZZZZZZZZZZZZZZZ1", "01JGZZZZZZZZZZZZZZZZZZZZZ2"]
    engine = create_store_engine(database_url)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "0003")
        with engine.begin() as connection:
            for run_id in ids:
                connection.execute(
                    V3_RUNS.insert().values(
                        id=run_id,
                        job_name="legacy",
                        backend="local",
                        app="jobrunner-local",
                        state="dead",
                        trigger="queue",
                        attempts=1,
                        max_attempts=1,
                        cancel_requested=False,
                        priority=0,
                        job_snapshot=old_snapshot,
                        created_at=at,
                        updated_at=at,
                    )
                )
    finally:
        engine.dispose()

    with Store(database_url) as store:  # opening it migrates it
        assert store.blob_usage() == (2, len(data) + len(text))
        run = store.get_run(ids[0])
        entries = run.job_snapshot["files"]
        assert entries[0] == {
            "guest_path": "/srv/a.bin",
            "source": "a.bin",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
        assert entries[1] == {
            "guest_path": "/etc/b.txt",
            "mode": 0o600,
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "size": len(text),
        }
        assert entries[2] == {"guest_path": "/etc/small", "content": "tiny"}
        # It still runs as it was recorded: the same bytes in the machine config.
        job = Job.from_snapshot(run.job_snapshot)
        blobs = {d: store.get_blob(d) for d in job.blob_digests()}
        config = job.to_machine_config(environ={}, metadata={}, blobs=blobs)
        assert [base64.b64decode(f.raw_value or "") for f in config.files or []] == [
            data,
            text.encode(),
            b"tiny",
        ]
        # And it can be queued again (`jobrunner runs retry`).
        again = store.retry_run(ids[1], extra_attempts=1)
        assert again.state == "pending" and again.job_snapshot == run.job_snapshot
    # Which run uses which blob was recorded too (pruning relies on it).
    engine = create_store_engine(database_url)
    try:
        with engine.connect() as db:
            uses = db.execute(sa.text("SELECT run_id, sha256 FROM run_blobs")).all()
    finally:
        engine.dispose()
    assert sorted(r.run_id for r in uses) == sorted(ids * 2)
