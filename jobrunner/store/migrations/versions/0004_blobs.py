"""Job file contents stored once, content-addressed (``blobs``), and which run uses which
(``run_blobs``); snapshots recorded before hold large files inline, and are moved over.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Written out in full, like 0001, so it keeps meaning the same thing when the models change.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# As jobrunner.spec.files.INLINE_MAX_BYTES when this was written: larger files leave the snapshot.
INLINE_MAX_BYTES = 16 * 1024
BATCH = 200

RUNS = sa.table("runs", sa.column("id", sa.String(26)), sa.column("job_snapshot", sa.JSON()))
BLOBS = sa.table(
    "blobs",
    sa.column("sha256", sa.String(64)),
    sa.column("size", sa.BigInteger()),
    sa.column("data", sa.LargeBinary()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
RUN_BLOBS = sa.table("run_blobs", sa.column("run_id", sa.String(26)), sa.column("sha256"))


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_blobs"),
    )
    op.create_table(
        "run_blobs",
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "sha256", name="pk_run_blobs"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_run_blobs_run_id_runs", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_run_blobs_sha256", "run_blobs", ["sha256"])
    _move_inline_files(op.get_bind())


def downgrade() -> None:
    # Snapshots that refer to blobs cannot be read by the older version: put the bytes back.
    bind = op.get_bind()
    stored = {row.sha256: row.data for row in bind.execute(sa.select(BLOBS.c.sha256, BLOBS.c.data))}
    if stored:
        rows = bind.execute(
            sa.select(RUNS.c.id, RUNS.c.job_snapshot).where(
                RUNS.c.id.in_(sa.select(RUN_BLOBS.c.run_id))
            )
        ).all()
        for row in rows:
            snapshot = dict(row.job_snapshot)
            files = []
            for entry in snapshot.get("files") or []:
                digest = entry.get("sha256") if isinstance(entry, dict) else None
                if digest in stored:
                    entry = {k: v for k, v in entry.items() if k not in ("sha256", "size")}
                    raw = stored[digest]
                    if "source" in entry:
                        entry["raw_value"] = base64.b64encode(raw).decode("ascii")
                    else:
                        entry["content"] = raw.decode("utf-8")
                files.append(entry)
            snapshot["files"] = files
            bind.execute(RUNS.update().where(RUNS.c.id == row.id).values(job_snapshot=snapshot))
    op.drop_index("ix_run_blobs_sha256", table_name="run_blobs")
    op.drop_table("run_blobs")
    op.drop_table("blobs")


def _move_inline_files(bind: sa.Connection) -> None:
    """Move the large inline files of existing snapshots (``content`` text, ``raw_value``
    base64) into ``blobs``, each distinct file once; their entries keep sha256 and size."""
    now = datetime.now(UTC)
    if bind.dialect.name == "sqlite":
        now = now.replace(tzinfo=None)  # as UTCDateTime stores it on SQLite
    large = sa.func.length(sa.cast(RUNS.c.job_snapshot, sa.Text())) > INLINE_MAX_BYTES
    after = ""
    while True:
        rows = bind.execute(
            sa.select(RUNS.c.id, RUNS.c.job_snapshot)
            .where(large, RUNS.c.id > after)
            .order_by(RUNS.c.id)
            .limit(BATCH)
        ).all()
        if not rows:
            return
        after = rows[-1].id
        for row in rows:
            snapshot, blobs = _externalise(row.job_snapshot)
            if not blobs:
                continue
            known = {
                r.sha256
                for r in bind.execute(
                    sa.select(BLOBS.c.sha256).where(BLOBS.c.sha256.in_(list(blobs)))
                )
            }
            for digest, raw in blobs.items():
                if digest not in known:
                    bind.execute(
                        BLOBS.insert().values(
                            sha256=digest, size=len(raw), data=raw, created_at=now
                        )
                    )
            bind.execute(RUN_BLOBS.insert(), [{"run_id": row.id, "sha256": d} for d in blobs])
            bind.execute(RUNS.update().where(RUNS.c.id == row.id).values(job_snapshot=snapshot))


def _externalise(snapshot: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("files"), list):
        return snapshot, {}
    blobs: dict[str, bytes] = {}
    files: list[Any] = []
    for entry in snapshot["files"]:
        raw: bytes | None = None
        if isinstance(entry, dict) and entry.get("secret_name") is None:
            if isinstance(entry.get("content"), str):
                try:
                    raw = entry["content"].encode()
                except UnicodeEncodeError:
                    raw = None
            elif isinstance(entry.get("raw_value"), str):
                try:
                    raw = base64.b64decode(entry["raw_value"], validate=True)
                except (binascii.Error, ValueError):
                    raw = None  # left as it is: the run says what is wrong when it starts
        if raw is None or len(raw) <= INLINE_MAX_BYTES:
            files.append(entry)
            continue
        digest = hashlib.sha256(raw).hexdigest()
        blobs[digest] = raw
        kept = {k: v for k, v in entry.items() if k not in ("content", "raw_value")}
        files.append({**kept, "sha256": digest, "size": len(raw)})
    return {**snapshot, "files": files}, blobs
