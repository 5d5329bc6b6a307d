"""popularity and affinity decay on event counts

Item popularity, the trending window and user category affinity moved from seconds of event
time to counts of events (the stream sequence; a user's own events), so a half-life means the
same on a stream of any speed. The stored keys and trending slices were computed on the old
clock and cannot be converted: like 0002, this drops the derived feature rows together with
the event stream positions, and the service replays FRESHREC_EVENTS (which keeps every
accepted event) from the start on its next run. The catalogue and its followers' positions
(consumers named ``<replica>:catalog``) are kept.

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
    op.execute(sa.text("DELETE FROM feature_users"))
    op.execute(sa.text("DELETE FROM feature_items"))
    followers = sa.text("DELETE FROM feature_consumer_position WHERE consumer NOT LIKE :catalogue")
    op.execute(followers.bindparams(catalogue="%:catalog"))


def downgrade() -> None:
    # The same reset in the other direction: an older version replays the stream on its clock.
    upgrade()
