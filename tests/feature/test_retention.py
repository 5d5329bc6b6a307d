"""Retention in the feature service: interactions and touched items accepted before the cutoff
are dropped, a user with nothing newer is forgotten whole (memory and SQL), and a user who comes
back starts afresh."""

from __future__ import annotations

import asyncio
from pathlib import Path

from freshrec.v1 import event_pb2, feature_pb2
from services.feature.rebuild import MIGRATIONS, VERSION_TABLE
from services.feature.state import FeatureState
from services.feature.store import FeatureStore
from shared.db import make_engine, make_sessionmaker, upgrade_schema
from shared.preprocessing import PreprocessingSettings
from shared.settings import DatabaseSettings
from tests.conftest import eventually
from tests.factories import event
from tests.feature.helpers import (
    T0,
    caught_up,
    last_sequence,
    publish,
    settings_for,
    started,
    stored_state,
    stub,
)

RATE = event_pb2.EVENT_TYPE_RATE


def test_expiry_trims_histories_and_forgets_idle_users_in_memory_and_sql(tmp_path: Path) -> None:
    engine = make_engine(DatabaseSettings(url=f"sqlite:///{tmp_path / 'f.db'}"))
    upgrade_schema(engine, MIGRATIONS, VERSION_TABLE)
    store = FeatureStore(make_sessionmaker(engine), "r")
    state = FeatureState(10, PreprocessingSettings(repeat_window_s=0))
    accepted = [T0, T0 + 1, T0 + 2, T0 + 10, T0 + 11]
    events = [
        event("old", "a", type=RATE, value=5.0, at=T0),
        event("mixed", "a", at=T0 + 1),
        event("mixed", "b", at=T0 + 2),
        event("mixed", "c", at=T0 + 10),
        event("mixed", "b", at=T0 + 11),  # b touched again: it stays
    ]
    for seq, (e, at) in enumerate(zip(events, accepted, strict=True), 1):
        state.apply(e, seq, at)
    store.save(*state.take_dirty())
    assert state.expire_users(list(state.users), cutoff=T0 + 5) == (1, 1)
    assert "old" not in state.users and state.preprocessor.users.get("old") is None
    mixed = state.users["mixed"]
    assert [r[0] for r in mixed.recent] == ["c", "b"] and list(mixed.seen) == ["c", "b"]
    assert state.expire_users(list(state.users), cutoff=T0 + 5) == (0, 0)  # nothing more to do
    # The items' popularity is an aggregate over everyone and stays.
    assert {i for i, _ in state.popular(5)} == {"a", "b", "c"}
    store.save(*state.take_dirty())
    loaded = FeatureState(10, PreprocessingSettings(repeat_window_s=0))
    store.load(loaded)
    assert loaded.dump() == state.dump() and "old" not in loaded.users
    # A user who comes back later is a new user.
    state.apply(event("old", "z", at=T0 + 20), 6, T0 + 20)
    assert [r[0] for r in state.users["old"].recent] == ["z"]
    assert state.users["old"].counts == {"EVENT_TYPE_CLICK": 1}
    assert "old" not in state.deleted_users
    engine.dispose()


def test_a_user_forgotten_during_a_snapshot_is_written_as_of_the_snapshot_then_deleted(
    tmp_path: Path,
) -> None:
    engine = make_engine(DatabaseSettings(url=f"sqlite:///{tmp_path / 'f.db'}"))
    upgrade_schema(engine, MIGRATIONS, VERSION_TABLE)
    store = FeatureStore(make_sessionmaker(engine), "r")
    state = FeatureState(10)
    state.apply(event("u", "a", at=T0), 1, T0)
    snapshot = state.begin_snapshot()
    assert state.expire_users(["u"], cutoff=T0 + 1) == (0, 1)
    assert state.snapshot_step(None)
    assert set(snapshot.users) == {"u"}  # the snapshot shows u at its watermark
    store.save(snapshot.users, snapshot.items, snapshot.watermark, snapshot.deleted_users)
    store.save(*state.take_dirty())  # the next commit deletes the row
    loaded = FeatureState(10)
    store.load(loaded)
    assert loaded.users == {}
    engine.dispose()


async def test_the_service_forgets_users_older_than_the_retention(
    nats_server, nats_client, tmp_path: Path
) -> None:
    settings = settings_for(
        nats_server, tmp_path, retention={"events": 3.0, "sweep_interval_s": 0.2}, commit_interval_s=0.1
    )
    app = await started(settings)
    channel, client = stub(app)
    try:
        await publish(nats_client, [event("early", f"i{n}", event_id=f"a{n}") for n in range(3)])
        await asyncio.sleep(1.5)
        await publish(nats_client, [event("late", f"i{n}", event_id=f"b{n}") for n in range(3)])
        await caught_up(app, await last_sequence(nats_client))

        async def known(user_id: str) -> bool:
            response = await client.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id=user_id))
            return response.features.known

        async def early_gone() -> bool:
            return not await known("early") and await known("late")

        await eventually(early_gone, what="the early user forgotten, the late one still known")

        async def early_gone_from_sql() -> bool:
            return "early" not in (await asyncio.to_thread(stored_state, settings))["users"]

        await eventually(early_gone_from_sql, what="the early user's row deleted")
        assert app.state is not None and len(app.state.users) >= 1
    finally:
        await channel.close()
        await app.stop()
