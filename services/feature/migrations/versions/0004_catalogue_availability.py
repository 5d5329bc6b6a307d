"""catalogue availability: hidden, available_until, deleted (tombstones)

A hidden entry, or one past its ``available_until``, stays in the catalogue but is served nowhere.
A deleted entry keeps only its id and revision (its content is cleared) so revisions stay
monotonic across a delete and a later re-upsert, and the outbox can publish its tombstone.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("catalog_items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hidden", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("available_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("deleted", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM catalog_items WHERE deleted"))
    with op.batch_alter_table("catalog_items", schema=None) as batch_op:
        batch_op.drop_column("deleted")
        batch_op.drop_column("available_until")
        batch_op.drop_column("hidden")
