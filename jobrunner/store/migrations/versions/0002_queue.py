"""The durable queue (a run's queue, priority and idempotency key, and the indexes that claim),
and the rate-limit buckets every process sharing the ledger takes its API calls from.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Written out in full, like 0001, so it keeps meaning the same thing when the models change.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_buckets",
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_rate_buckets"),
    )
    # batch mode: SQLite cannot ALTER most things in place (Alembic copies the table there).
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("queue", sa.String(64), nullable=True))
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("idempotency_key", sa.String(255), nullable=True))
        batch.create_index("ix_runs_state_queue_priority", ["state", "queue", "priority"])
        batch.create_index("ix_runs_idempotency_key", ["idempotency_key"])
        batch.create_index("ix_runs_owner", ["owner"])


def downgrade() -> None:
    op.drop_table("rate_buckets")
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_owner")
        batch.drop_index("ix_runs_idempotency_key")
        batch.drop_index("ix_runs_state_queue_priority")
        batch.drop_column("idempotency_key")
        batch.drop_column("priority")
        batch.drop_column("queue")
