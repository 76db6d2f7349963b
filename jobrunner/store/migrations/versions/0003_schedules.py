"""Cron schedules (how far each schedule's ticks are decided, and one row per decision), and
when each attempt's log lines were known to be all copied.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Written out in full, like 0001, so it keeps meaning the same thing when the models change.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("decided_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_schedules"),
    )
    op.create_table(
        "schedule_fires",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("schedule", sa.String(100), nullable=False),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("run_id", sa.String(26), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_schedule_fires"),
        sa.UniqueConstraint(
            "schedule", "scheduled_for", name="uq_schedule_fires_schedule_scheduled_for"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_schedule_fires_run_id_runs", ondelete="SET NULL"
        ),
    )
    op.create_index("ix_schedule_fires_schedule_id", "schedule_fires", ["schedule", "id"])
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("logs_copied_at", sa.DateTime(timezone=True), nullable=True))
    # Attempts recorded before this version are taken as copied: their drivers drained them.
    op.execute("UPDATE attempts SET logs_copied_at = finished_at WHERE finished_at IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("logs_copied_at")
    op.drop_index("ix_schedule_fires_schedule_id", table_name="schedule_fires")
    op.drop_table("schedule_fires")
    op.drop_table("schedules")
