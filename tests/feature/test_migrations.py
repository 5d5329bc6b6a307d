"""Revision 0003 drops feature rows computed on the old clock and the event positions (so the
stream is replayed), and keeps the catalogue and its followers' positions."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from cli import db


def test_0003_resets_derived_state_and_keeps_the_catalogue(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    db.upgrade("feature", url, "0002")
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO feature_users VALUES ('r', 'u1', '{}')"))
        c.execute(sa.text("INSERT INTO feature_items VALUES ('r', 'i1', '{}')"))
        c.execute(
            sa.text("INSERT INTO feature_consumer_position VALUES ('r', 900, 1.0), ('r:catalog', 40, 0.0)")
        )
        c.execute(
            sa.text(
                "INSERT INTO catalog_items (item_id, title, categories, tags, attributes, description,"
                " created_at, updated_at, revision, published)"
                " VALUES ('i1', 't', '[]', '[]', '{}', '', NULL, CURRENT_TIMESTAMP, 3, 1)"
            )
        )
    db.upgrade("feature", url)
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM feature_users")).scalar() == 0
        assert c.execute(sa.text("SELECT count(*) FROM feature_items")).scalar() == 0
        positions = c.execute(sa.text("SELECT consumer, stream_sequence FROM feature_consumer_position"))
        assert list(positions) == [("r:catalog", 40)]
        assert c.execute(sa.text("SELECT revision FROM catalog_items")).scalar() == 3
    engine.dispose()
