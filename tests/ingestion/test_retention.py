"""Retention in ingestion: the SQL event log and every stream it owns keep an accepted event no
longer than FRESHREC_RETENTION__EVENTS (real SQLite, real nats-server)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import nats
import pytest
from pydantic import ValidationError

from freshrec.v1 import ingestion_pb2
from services.ingestion.nats_intake import DLQ_MAX_AGE_S, DLQ_STREAM, RAW_STREAM
from services.ingestion.server import MIGRATIONS, VERSION_TABLE
from services.ingestion.store import EventLog
from shared.db import make_engine, upgrade_schema
from shared.nats import EVENTS_STREAM
from shared.settings import DatabaseSettings, RetentionSettings
from tests.conftest import eventually
from tests.factories import event
from tests.harness import NatsServer
from tests.ingestion.conftest import AppFactory, stub_for
from tests.ingestion.helpers import committed_ids, sqlite_path, stream_ids


def rows(
    n: int, received_us: int, first: int = 0
) -> list[tuple[str, str, str, int, float, int, int, bytes, str]]:
    return [(f"e{first + k}", "u", "i", 1, 0.0, received_us, received_us, b"", "") for k in range(n)]


def test_expire_deletes_what_was_accepted_before_the_cutoff_oldest_first(tmp_path: Path) -> None:
    engine = make_engine(DatabaseSettings(url=f"sqlite:///{tmp_path / 'ingestion.db'}"))
    upgrade_schema(engine, MIGRATIONS, VERSION_TABLE)
    log = EventLog(engine)
    log.prepare()
    stored, _ = log.commit([rows(25, 1_000), rows(10, 2_000, first=25), rows(3, 1_500, first=35)])
    log.mark_published([e.seq for e in stored[0][:20]])
    # Walked in batches of 7: the 25 old ones go (5 of them never published), then the batch
    # holding young ones stops the walk; the 3 old ones committed after the young ones wait.
    assert log.expire(1_600, batch=7) == (25, 5)
    assert log.expire(1_600, batch=7) == (0, 0)
    assert log.expire(1_600, batch=100) == (3, 3)
    assert log.count_unpublished() == 10
    assert log.expire(10**12) == (10, 10)
    engine.dispose()


def test_retention_must_be_positive_and_bounds_each_streams_age() -> None:
    with pytest.raises(ValidationError, match="positive"):
        RetentionSettings(events=timedelta(0))
    assert RetentionSettings().max_age_s(DLQ_MAX_AGE_S) == DLQ_MAX_AGE_S
    assert RetentionSettings().max_age_s() is None
    r = RetentionSettings.model_validate({"events": "P2D"})
    assert r.max_age_s(DLQ_MAX_AGE_S) == 2 * 86_400 and r.max_age_s() == 2 * 86_400
    assert r.cutoff(1_000_000.0) == 1_000_000.0 - 2 * 86_400


async def test_the_log_and_the_streams_forget_events_older_than_the_retention(
    make_app: AppFactory, nats_server: NatsServer, tmp_path: Path
) -> None:
    app = await make_app(retention={"events": 4.0, "sweep_interval_s": 0.2})
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    for stream in (EVENTS_STREAM, RAW_STREAM, DLQ_STREAM):
        assert (await js.stream_info(stream)).config.max_age == pytest.approx(4.0), stream
    channel, stub = stub_for(app)
    db = sqlite_path(app.settings.database.url)
    try:
        old = [event("u1", f"i{n}", event_id=f"old-{n}") for n in range(5)]
        await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=old))
        assert committed_ids(db) == [e.event_id for e in old]
        await asyncio.sleep(2.0)
        young = [event("u2", f"i{n}", event_id=f"young-{n}") for n in range(5)]
        await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=young))

        async def only_young() -> bool:
            return committed_ids(db) == [e.event_id for e in young] and await stream_ids(nats_server.url) == [
                e.event_id for e in young
            ]

        await eventually(only_young, what="the older events gone from SQL and FRESHREC_EVENTS", timeout_s=15)

        async def nothing() -> bool:
            return committed_ids(db) == [] and await stream_ids(nats_server.url) == []

        await eventually(nothing, what="every event gone once older than the retention", timeout_s=15)
    finally:
        await channel.close()
        await nc.close()
