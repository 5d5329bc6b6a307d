"""replica-keyed feature rows; catalogue revisions and outbox

Feature rows gain the replica that computed them (partitioned replicas may share a database).
The rows before this revision are derived data: they are dropped together with the stream
position, so the service replays FRESHREC_EVENTS from the start on its next run (its consumer
is recreated at the stored position). Catalogue entries gain a revision and a ``published``
flag; existing entries are published to FRESHREC_CATALOG by the relay.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _feature_table(name: str, key: str) -> None:
    op.create_table(
        name,
        sa.Column("replica", sa.String(length=64), nullable=False),
        sa.Column(key, sa.String(length=128), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("replica", key),
    )


def upgrade() -> None:
    op.drop_table("feature_users")
    op.drop_table("feature_items")
    _feature_table("feature_users", "user_id")
    _feature_table("feature_items", "item_id")
    op.execute(sa.text("DELETE FROM feature_consumer_position"))

    with op.batch_alter_table("catalog_items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("revision", sa.Integer(), server_default=sa.text("1"), nullable=False))
        batch_op.add_column(sa.Column("published", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.create_index(
            "ix_catalog_items_unpublished",
            ["updated_at"],
            unique=False,
            sqlite_where=sa.text("published = 0"),
            postgresql_where=sa.text("published = false"),
        )


def downgrade() -> None:
    with op.batch_alter_table("catalog_items", schema=None) as batch_op:
        batch_op.drop_index("ix_catalog_items_unpublished")
        batch_op.drop_column("published")
        batch_op.drop_column("revision")
    op.drop_table("feature_users")
    op.drop_table("feature_items")
    for name, key in (("feature_users", "user_id"), ("feature_items", "item_id")):
        op.create_table(
            name,
            sa.Column(key, sa.String(length=128), nullable=False),
            sa.Column("state", sa.JSON(), nullable=False),
            sa.PrimaryKeyConstraint(key),
        )
    op.execute(sa.text("DELETE FROM feature_consumer_position"))
