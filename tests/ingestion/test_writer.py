"""The group-commit writer on a real SQLite event log: a stop never hangs on a broken database."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import text

from services.ingestion.server import MIGRATIONS, VERSION_TABLE
from services.ingestion.store import EventLog
from services.ingestion.writer import STOP_RETRY_S, GroupCommitter
from shared.db import make_engine, upgrade_schema
from shared.settings import DatabaseSettings


async def test_a_stop_gives_up_on_marks_the_database_cannot_take(tmp_path: Path) -> None:
    engine = make_engine(DatabaseSettings(url=f"sqlite:///{tmp_path / 'ingestion.db'}"))
    upgrade_schema(engine, MIGRATIONS, VERSION_TABLE)
    committer = GroupCommitter(EventLog(engine), mark_delay_s=0.01)
    committer.start()
    try:
        with engine.begin() as connection:  # every later commit fails: the table is gone
            connection.execute(text("DROP TABLE events"))
        committer.mark_published([1, 2, 3])
        # Marks that cannot be written are retried, but a stop does not wait for the database forever.
        await asyncio.wait_for(committer.stop(), timeout=STOP_RETRY_S + 20)
    finally:
        engine.dispose()
