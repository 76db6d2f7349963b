"""The run ledger: runs, attempts, run_transitions, log_lines.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written out in full (not importing jobrunner.store.tables) so that this revision keeps creating the
same schema when the models change later; later changes get their own revisions.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _id() -> sa.Column[int]:
    # SQLite only auto-increments an INTEGER PRIMARY KEY.
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False)


def _when(name: str, *, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _run_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["run_id"], ["runs.id"], name=f"fk_{table}_run_id_runs", ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(26), nullable=False),
        sa.Column("job_name", sa.String(100), nullable=False),
        sa.Column("job_snapshot", sa.JSON(), nullable=False),
        sa.Column("backend", sa.String(16), nullable=False),
        sa.Column("app", sa.String(100), nullable=True),
        sa.Column("region", sa.String(32), nullable=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("timeout_s", sa.Float(), nullable=True),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("owner", sa.String(255), nullable=True),
        _when("owner_expires_at"),
        _when("next_attempt_at"),
        _when("created_at", nullable=False),
        _when("started_at"),
        _when("finished_at"),
        _when("updated_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_index("ix_runs_state", "runs", ["state"])
    op.create_index("ix_runs_job_name_created_at", "runs", ["job_name", "created_at"])
    op.create_index("ix_runs_created_at", "runs", ["created_at"])

    op.create_table(
        "attempts",
        _id(),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("submit_id", sa.String(100), nullable=False),
        sa.Column("machine_id", sa.String(64), nullable=True),
        sa.Column("instance_id", sa.String(64), nullable=True),
        sa.Column("region", sa.String(32), nullable=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("oom_killed", sa.Boolean(), nullable=True),
        sa.Column("signal", sa.Integer(), nullable=True),
        sa.Column("requested_stop", sa.Boolean(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        _when("created_at", nullable=False),
        _when("started_at"),
        _when("finished_at"),
        _run_fk("attempts"),
        sa.PrimaryKeyConstraint("id", name="pk_attempts"),
        sa.UniqueConstraint("run_id", "number", name="uq_attempts_run_id_number"),
        sa.UniqueConstraint("submit_id", name="uq_attempts_submit_id"),
    )
    op.create_index("ix_attempts_machine_id", "attempts", ["machine_id"])

    op.create_table(
        "run_transitions",
        _id(),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("attempt_number", sa.Integer(), nullable=True),
        sa.Column("from_state", sa.String(20), nullable=True),
        sa.Column("to_state", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        _when("at", nullable=False),
        _run_fk("run_transitions"),
        sa.PrimaryKeyConstraint("id", name="pk_run_transitions"),
    )
    op.create_index("ix_run_transitions_run_id_id", "run_transitions", ["run_id", "id"])

    op.create_table(
        "log_lines",
        _id(),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("attempt_number", sa.Integer(), nullable=False),
        sa.Column("entry_id", sa.String(128), nullable=False),
        _when("ts", nullable=False),
        sa.Column("stream", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        _run_fk("log_lines"),
        sa.PrimaryKeyConstraint("id", name="pk_log_lines"),
        sa.UniqueConstraint(
            "run_id",
            "attempt_number",
            "entry_id",
            name="uq_log_lines_run_id_attempt_number_entry_id",
        ),
    )
    op.create_index("ix_log_lines_run_id_id", "log_lines", ["run_id", "id"])


def downgrade() -> None:
    op.drop_table("log_lines")
    op.drop_table("run_transitions")
    op.drop_index("ix_attempts_machine_id", table_name="attempts")
    op.drop_table("attempts")
    op.drop_table("runs")
