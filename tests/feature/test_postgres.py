"""The feature service's SQL on a real PostgreSQL: migrations, upserts, the exact state round
trip, the catalogue's revisions and outbox, and the service end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from freshrec.v1 import feature_pb2, item_pb2
from services.feature.rebuild import MIGRATIONS, VERSION_TABLE, rebuild
from services.feature.state import FeatureState
from services.feature.store import FeatureStore, Revision
from shared.db import make_engine, make_sessionmaker, upgrade_schema
from shared.settings import DatabaseSettings
from tests.feature.helpers import caught_up, publish, settings_for, started, stored_state, stub, workload

pytestmark = pytest.mark.postgres


def test_state_and_catalogue_round_trip_on_postgres(postgres_url: str) -> None:
    engine = make_engine(DatabaseSettings(url=postgres_url))
    upgrade_schema(engine, MIGRATIONS, VERSION_TABLE)
    store = FeatureStore(make_sessionmaker(engine), "r0")
    revisions = store.upsert_items(
        [item_pb2.Item(item_id=f"i{n}", categories=[f"c{n % 3}"]) for n in range(60)]
        + [item_pb2.Item(item_id="i1", title="again", categories=["c1"])]  # later wins within a batch
    )
    assert len(revisions) == 60 and {r.revision for r in revisions} == {1}
    assert [r.revision for r in store.upsert_items([item_pb2.Item(item_id="i1", categories=["c9"])])] == [2]
    assert len(store.unpublished(1000)) == 60
    store.mark_published(revisions)
    assert [r.item.item_id for r in store.unpublished(10)] == ["i1"]  # revision 2 is not published yet
    # Following an older revision changes nothing; a newer one replaces it.
    assert store.follow([Revision(item_pb2.Item(item_id="i1"), 1)], 5, "r0:catalog") == []
    fresh = store.follow([Revision(item_pb2.Item(item_id="i1", categories=["new"]), 3)], 6, "r0:catalog")
    assert [r.revision for r in fresh] == [3]
    assert (
        store.get_items(["i1"])["i1"].categories == ["new"]
        and store.position("r0:catalog").stream_sequence == 6
    )

    live = FeatureState(10)
    store.load(live)
    events = workload(2000)
    for seq, e in enumerate(events, 1):
        live.apply(e, seq)
        if seq % 700 == 0:
            store.save(*live.take_dirty())
    store.save(*live.take_dirty())
    loaded = FeatureState(10)
    store.load(loaded)
    assert json.dumps(loaded.dump(), sort_keys=True) == json.dumps(live.dump(), sort_keys=True)
    # Another replica's rows in the same database are its own.
    other = FeatureStore(make_sessionmaker(engine), "r1")
    empty = FeatureState(10)
    other.load(empty)
    assert not empty.users and empty.watermark.stream_sequence == 0
    engine.dispose()


async def test_the_service_and_rebuild_on_postgres(
    nats_server, nats_client, tmp_path: Path, postgres_url: str
) -> None:
    settings = settings_for(nats_server, tmp_path, database={"url": postgres_url})
    assert settings.database.url.startswith("postgresql")
    app = await started(settings)
    channel, feature = stub(app)
    await feature.UpsertItems(
        feature_pb2.UpsertItemsRequest(
            items=[item_pb2.Item(item_id=f"i{n}", categories=["x"]) for n in range(10)]
        )
    )
    events = workload(1500, seed=3)
    await publish(nats_client, events)
    await caught_up(app, len(events))
    assert app.state is not None
    live = json.dumps(app.state.dump(), sort_keys=True)
    await channel.close()
    await app.stop()
    assert json.dumps(stored_state(settings), sort_keys=True) == live
    rebuilt = await rebuild(settings)
    assert json.dumps(rebuilt.dump(), sort_keys=True) == live
