"""lean event log, outbox owners and replicas

The hot path inserts every event, so the row keeps only what queries need beside the payload:
times become integer microseconds (no per-row datetime formatting), context and session_id live
in the payload only, and the per-user index goes (nothing queries by user here). Each row gets
the replica that owns its publishing, and replicas sharing the database register in
``ingestion_replicas``.

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


def _epoch_us(name: str) -> sa.ColumnElement[int]:
    """A DateTime column written by revision 0001, as microseconds since the epoch."""
    column: sa.ColumnClause[str] = sa.column(name)
    if op.get_bind().dialect.name == "postgresql":
        return sa.cast(sa.func.extract("epoch", column) * 1_000_000, sa.BigInteger)
    # SQLite keeps SQLAlchemy DateTime as 'YYYY-MM-DD HH:MM:SS.ffffff' text (UTC here).
    seconds = sa.cast(sa.func.strftime("%s", column), sa.BigInteger)
    micros = sa.cast(sa.func.coalesce(sa.func.substr(column, 21, 6), "0"), sa.BigInteger)
    return seconds * 1_000_000 + micros


def upgrade() -> None:
    op.create_table(
        "ingestion_replicas",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("started_at_us", sa.BigInteger(), nullable=False),
        sa.Column("heartbeat_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("occurred_at_us", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("received_at_us", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("owner", sa.String(length=32), server_default="", nullable=False))

    events = sa.table(
        "events",
        sa.column("occurred_at_us", sa.BigInteger()),
        sa.column("received_at_us", sa.BigInteger()),
    )
    op.execute(
        events.update().values(
            occurred_at_us=_epoch_us("occurred_at"), received_at_us=_epoch_us("received_at")
        )
    )

    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.alter_column("occurred_at_us", existing_type=sa.BigInteger(), nullable=False)
        batch_op.alter_column("received_at_us", existing_type=sa.BigInteger(), nullable=False)
        batch_op.drop_index("ix_events_user_id")
        batch_op.drop_index(
            "ix_events_unpublished",
            sqlite_where=sa.text("published = 0"),
            postgresql_where=sa.text("published = false"),
        )
        batch_op.drop_column("occurred_at")
        batch_op.drop_column("received_at")
        batch_op.drop_column("context")
        batch_op.drop_column("session_id")
        batch_op.create_index(
            "ix_events_outbox",
            ["owner", "seq"],
            unique=False,
            sqlite_where=sa.text("published = 0"),
            postgresql_where=sa.text("published = false"),
        )


def downgrade() -> None:
    # The dropped columns come back empty except the times; context and session_id stay in payload.
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_events_outbox",
            sqlite_where=sa.text("published = 0"),
            postgresql_where=sa.text("published = false"),
        )
        batch_op.add_column(sa.Column("session_id", sa.String(length=128), server_default="", nullable=False))
        batch_op.add_column(sa.Column("context", sa.JSON(), server_default="{}", nullable=False))
        batch_op.add_column(sa.Column("received_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "UPDATE events SET occurred_at = to_timestamp(occurred_at_us / 1000000.0), "
            "received_at = to_timestamp(received_at_us / 1000000.0)"
        )
    else:
        op.execute(
            "UPDATE events SET "
            "occurred_at = strftime('%Y-%m-%d %H:%M:%f', occurred_at_us / 1000000.0, 'unixepoch'), "
            "received_at = strftime('%Y-%m-%d %H:%M:%f', received_at_us / 1000000.0, 'unixepoch')"
        )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.alter_column("occurred_at", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch_op.alter_column("received_at", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch_op.drop_column("owner")
        batch_op.drop_column("received_at_us")
        batch_op.drop_column("occurred_at_us")
        batch_op.create_index("ix_events_user_id", ["user_id"], unique=False)
        batch_op.create_index(
            "ix_events_unpublished",
            ["seq"],
            unique=False,
            sqlite_where=sa.text("published = 0"),
            postgresql_where=sa.text("published = false"),
        )
    op.drop_table("ingestion_replicas")
