"""The ingestion schema's Alembic revisions: 0002 keeps the rows written under 0001 and is reversible."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    inspect,
    text,
)

from services.ingestion.server import MIGRATIONS, VERSION_TABLE
from shared.db import alembic_config, make_engine
from shared.settings import DatabaseSettings


def migrate(url: str, revision: str, down: bool = False) -> None:
    engine = make_engine(DatabaseSettings(url=url))
    config = alembic_config(MIGRATIONS, VERSION_TABLE)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)
    engine.dispose()


def check_upgrade_keeps_rows(url: str) -> None:
    migrate(url, "0001")
    engine = create_engine(url)
    occurred = datetime(2026, 3, 4, 5, 6, 7, 250000, tzinfo=UTC)
    received = datetime(2026, 3, 4, 5, 6, 9, tzinfo=UTC)
    with engine.begin() as connection:
        events = Table(
            "events",
            MetaData(),
            Column("seq", Integer, primary_key=True),
            Column("event_id", String),
            Column("user_id", String),
            Column("item_id", String),
            Column("type", Integer),
            Column("value", Float),
            Column("occurred_at", DateTime(timezone=True)),
            Column("session_id", String),
            Column("context", JSON),
            Column("payload", LargeBinary),
            Column("received_at", DateTime(timezone=True)),
            Column("published", Boolean),
        )
        connection.execute(
            events.insert(),
            [
                {
                    "event_id": "old-1",
                    "user_id": "u",
                    "item_id": "i",
                    "type": 2,
                    "value": 0.0,
                    "occurred_at": occurred,
                    "session_id": "s",
                    "context": {},
                    "payload": b"x",
                    "received_at": received,
                    "published": False,
                }
            ],
        )
    engine.dispose()

    migrate(url, "head")
    engine = create_engine(url)
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT event_id, occurred_at_us, received_at_us, owner, published FROM events")
        ).one()
        columns = {c["name"] for c in inspect(connection).get_columns("events")}
        indexes = {i["name"] for i in inspect(connection).get_indexes("events")}
        tables = set(inspect(connection).get_table_names())
    engine.dispose()
    assert row[0] == "old-1"
    assert abs(row[1] - int(occurred.timestamp() * 1e6)) < 1000  # to the millisecond at least
    assert row[2] == int(received.timestamp() * 1e6)
    assert (row[3], bool(row[4])) == ("", False)  # unowned: the next replica to start adopts it
    assert {"occurred_at", "received_at", "context", "session_id"}.isdisjoint(columns)
    assert "ix_events_outbox" in indexes and "ingestion_replicas" in tables

    migrate(url, "0001", down=True)
    engine = create_engine(url)
    with engine.connect() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("events")}
        assert connection.execute(text("SELECT count(*) FROM events")).scalar_one() == 1
    engine.dispose()
    assert {"occurred_at", "received_at", "context", "session_id"} <= columns


def test_upgrade_and_downgrade_on_sqlite(tmp_path: Path) -> None:
    check_upgrade_keeps_rows(f"sqlite:///{tmp_path / 'ingestion.db'}")


@pytest.mark.postgres
def test_upgrade_and_downgrade_on_postgresql(postgres_url: str) -> None:
    check_upgrade_keeps_rows(postgres_url)
