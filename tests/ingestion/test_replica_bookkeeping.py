"""Replica registration in the shared database: heartbeats, lapses and orphaned outbox rows."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import delete, select

from services.ingestion.server import MIGRATIONS, VERSION_TABLE
from services.ingestion.store import EventLog, EventRow, ReplicaRow
from services.ingestion.writer import GroupCommitter, Heartbeat
from shared.db import make_engine, upgrade_schema
from shared.settings import DatabaseSettings
from tests.conftest import eventually
from tests.factories import event
from tests.harness import NatsServer
from tests.ingestion.conftest import AppFactory
from tests.ingestion.helpers import duplicated, stream_ids


def event_log(path: Path) -> EventLog:
    engine = make_engine(DatabaseSettings(url=f"sqlite:///{path}"))
    upgrade_schema(engine, MIGRATIONS, VERSION_TABLE)
    return EventLog(engine)


def row(event_id: str, owner: str) -> tuple:  # type: ignore[type-arg]
    e = event("u", "i", event_id=event_id)
    return (event_id, "u", "i", e.type, 0.0, 0, int(time.time() * 1e6), e.SerializeToString(), owner)


async def test_a_replica_taken_for_dead_registers_again_and_forgets_what_it_knew(tmp_path: Path) -> None:
    log = event_log(tmp_path / "ingestion.db")
    log.register_replica("me", "r", int(time.time() * 1e6))
    lapses: list[float] = []
    heartbeat = Heartbeat(
        "me", "r", interval_s=0.05, lease_s=5.0, on_lapse=lambda: lapses.append(time.time())
    )
    committer = GroupCommitter(log, heartbeat=heartbeat)
    committer.start()
    try:

        async def beating() -> bool:
            with log.engine.connect() as connection:
                beat = connection.execute(
                    select(ReplicaRow.heartbeat_at_us).where(ReplicaRow.id == "me")
                ).scalar()
            return bool(beat) and beat > (time.time() - 1) * 1e6

        await eventually(beating, what="heartbeats")
        assert lapses == []
        # Another replica decided this one was gone and removed its registration.
        with log.engine.begin() as connection:
            connection.execute(delete(ReplicaRow).where(ReplicaRow.id == "me"))

        async def back() -> bool:
            with log.engine.connect() as connection:
                name = connection.execute(select(ReplicaRow.name).where(ReplicaRow.id == "me")).scalar()
            return name == "r" and bool(lapses)

        await eventually(back, what="the replica to register again and report the lapse")
    finally:
        await committer.stop()


async def test_rows_of_an_unregistered_owner_are_adopted_at_start(
    make_app: AppFactory, nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "ingestion.db"
    log = event_log(db)
    # Outbox rows whose replica left no registration behind (say, its row was deleted by hand).
    stored, _ = log.commit([[row(f"ghost-{n}", "ghost") for n in range(5)]])
    assert len(stored[0]) == 5
    with log.engine.connect() as connection:
        assert connection.execute(select(ReplicaRow)).first() is None
    log.engine.dispose()

    app = await make_app(database={"url": f"sqlite:///{db}"})

    async def published() -> list[str] | None:
        ids = await stream_ids(nats_server.url)
        return ids if len(ids) >= 5 else None

    ids = await eventually(published, what="the orphaned rows to be published")
    assert sorted(ids) == [f"ghost-{n}" for n in range(5)] and not duplicated(ids)
    with app.log.engine.connect() as connection:  # type: ignore[union-attr]
        owners = {o for (o,) in connection.execute(select(EventRow.owner))}
    assert owners == {app.replica_id}
