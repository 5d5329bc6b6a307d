"""forget requests, their progress, tombstones

Forgetting a user (IngestionService.ForgetUser) records the request and each service's report,
and a tombstone that drops the user's late events; all three name the user by a keyed hash.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "forget_requests",
        sa.Column("request_id", sa.String(length=32), nullable=False),
        sa.Column("user_hash", sa.String(length=64), nullable=False),
        sa.Column("requested_at_us", sa.BigInteger(), nullable=False),
        sa.Column("task_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("completed_at_us", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
    )
    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_forget_requests_user_hash"), ["user_hash"], unique=False)
    op.create_table(
        "forget_progress",
        sa.Column("request_id", sa.String(length=32), nullable=False),
        sa.Column("service", sa.String(length=32), nullable=False),
        sa.Column("replica", sa.String(length=128), nullable=False),
        sa.Column("done_at_us", sa.BigInteger(), nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("request_id", "service", "replica"),
    )
    op.create_table(
        "tombstones",
        sa.Column("user_hash", sa.String(length=64), nullable=False),
        sa.Column("expires_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_hash"),
    )


def downgrade() -> None:
    op.drop_table("tombstones")
    op.drop_table("forget_progress")
    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_forget_requests_user_hash"))
    op.drop_table("forget_requests")
