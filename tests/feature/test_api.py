"""FeatureService over gRPC: freshness on every answer, cold-start users, input validation, and the
same answers after a restart."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from freshrec.v1 import event_pb2, feature_pb2, feature_pb2_grpc, item_pb2
from services.feature.server import FeatureApp
from tests.conftest import eventually
from tests.factories import event
from tests.feature.helpers import caught_up, publish, settings_for, started, stub


async def user_features(port: int, user: str) -> feature_pb2.GetUserFeaturesResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await feature_pb2_grpc.FeatureServiceStub(channel).GetUserFeatures(
            feature_pb2.GetUserFeaturesRequest(user_id=user)
        )


async def test_answers_carry_the_watermark_and_show_the_preprocessed_numbers(
    nats_server, nats_client, tmp_path: Path
) -> None:
    app = await started(
        settings_for(nats_server, tmp_path, preprocessing={"bot_max_events": 10, "bot_window_s": 60})
    )
    channel, feature = stub(app)
    try:
        await feature.UpsertItems(
            feature_pb2.UpsertItemsRequest(items=[item_pb2.Item(item_id="heat", categories=["crime"])])
        )
        now = time.time()
        events = [
            event("ann", "heat", type=event_pb2.EVENT_TYPE_PURCHASE, at=now - 30),
            event("ann", "alien", type=event_pb2.EVENT_TYPE_RATE, value=5.0, at=now - 20),
            event("ann", "up", type=event_pb2.EVENT_TYPE_VIEW, at=now - 10),
        ]
        events += [event("bot", f"spam{n}", at=now - 5 + n * 0.001) for n in range(12)]
        await publish(nats_client, events)
        await caught_up(app, len(events))

        ann = await feature.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id="ann", max_recent=2))
        f = ann.features
        assert f.known and not f.likely_bot
        assert [(i.item_id, i.weight) for i in f.recent][0] == ("up", 1.0)  # newest first
        assert [i.item_id for i in f.recent] == ["up", "alien"]  # max_recent=2
        assert f.recent[1].HasField("normalized_rating") and f.recent[1].normalized_rating > 0
        assert f.event_counts["EVENT_TYPE_PURCHASE"] == 1 and f.rating_count == 1
        assert f.rating_mean == pytest.approx((5 * 3.0 + 5.0) / 6)
        assert set(f.category_affinity) == {"crime"} and f.category_affinity["crime"] > 0
        assert ann.watermark.stream_sequence == len(events)
        assert ann.watermark.event_time.ToNanoseconds() == pytest.approx((now - 5 + 0.011) * 1e9, abs=1e3)
        assert 4.0 < ann.watermark.lag.ToTimedelta().total_seconds() < 600

        bot = await feature.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id="bot"))
        assert bot.features.likely_bot and len(bot.features.recent) == 12  # visible to itself

        nobody = await feature.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id="nobody"))
        assert not nobody.features.known and not nobody.features.recent
        assert nobody.watermark.stream_sequence == len(events)  # cold start, with freshness

        # Several users in one call: the same answers, in the order asked, one watermark.
        batch = await feature.BatchGetUserFeatures(
            feature_pb2.BatchGetUserFeaturesRequest(user_ids=["bot", "nobody", "ann", "ann"], max_recent=2)
        )
        assert [f.user_id for f in batch.features] == ["bot", "nobody", "ann", "ann"]
        assert batch.features[2] == batch.features[3] == f
        assert batch.features[1] == nobody.features and not batch.features[1].known
        assert batch.features[0].likely_bot and len(batch.features[0].recent) == 2
        assert batch.watermark.stream_sequence == len(events)

        items = await feature.GetItemFeatures(
            feature_pb2.GetItemFeaturesRequest(item_ids=["heat", "spam11", "zzz"])
        )
        heat, spam, unknown = items.items
        assert heat.known and heat.popularity == pytest.approx(5.0, rel=1e-3) and heat.trending == 5.0
        assert not spam.known  # only a likely bot touched it
        assert not unknown.known
        assert items.watermark.stream_sequence == len(events)

        popular = await feature.GetPopularItems(feature_pb2.GetPopularItemsRequest())
        assert "spam11" not in [p.item_id for p in popular.items] and popular.items[0].item_id == "heat"
        assert len(popular.items) <= 10 and popular.watermark.stream_sequence == len(events)
    finally:
        await channel.close()
        await app.stop()


@pytest.mark.parametrize(
    ("method", "request_", "reason"),
    [
        ("GetUserFeatures", feature_pb2.GetUserFeaturesRequest(), "user_id is empty"),
        (
            "GetUserFeatures",
            feature_pb2.GetUserFeaturesRequest(user_id="u" * 129),
            "user_id is longer than 128",
        ),
        ("BatchGetUserFeatures", feature_pb2.BatchGetUserFeaturesRequest(), "user_ids is empty"),
        (
            "BatchGetUserFeatures",
            feature_pb2.BatchGetUserFeaturesRequest(user_ids=["a", ""]),
            "user_ids has an empty id",
        ),
        (
            "BatchGetUserFeatures",
            feature_pb2.BatchGetUserFeaturesRequest(user_ids=["a"] * 1001),
            "user_ids has 1001 ids; at most 1000",
        ),
        (
            "GetItemFeatures",
            feature_pb2.GetItemFeaturesRequest(item_ids=["a", ""]),
            "item_ids has an empty id",
        ),
        (
            "GetItemFeatures",
            feature_pb2.GetItemFeaturesRequest(item_ids=["a"] * 1001),
            "item_ids has 1001 ids; at most 1000",
        ),
        ("GetItems", feature_pb2.GetItemsRequest(item_ids=["x" * 129]), "item_ids has an id longer than 128"),
        ("ListItems", feature_pb2.ListItemsRequest(page_size=1001), "page_size must be at most 1000"),
        ("GetPopularItems", feature_pb2.GetPopularItemsRequest(k=1001), "k is 1001; at most 1000"),
        (
            "GetPopularItems",
            feature_pb2.GetPopularItemsRequest(category="c" * 65),
            "category is longer than 64",
        ),
        ("GetPopularItems", feature_pb2.GetPopularItemsRequest(window=7), "window 7 is not a known"),  # type: ignore[arg-type]
    ],
)
async def test_invalid_requests_are_refused_with_a_reason(
    nats_server,
    tmp_path: Path,
    method: str,
    request_,
    reason: str,  # type: ignore[no-untyped-def]
) -> None:
    app = await started(settings_for(nats_server, tmp_path))
    channel, feature = stub(app)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await getattr(feature, method)(request_)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in (caught.value.details() or "")
    finally:
        await channel.close()
        await app.stop()


async def test_features_follow_the_stream_and_survive_restart(
    nats_server, nats_client, tmp_path: Path
) -> None:
    events = [event("u1", f"i{n}", event_id=f"e{n}", at=1_700_000_000 + n) for n in range(5)]
    events.append(event("u2", "i4", event_id="p1", type=event_pb2.EVENT_TYPE_PURCHASE, at=1_700_000_010))
    await publish(nats_client, events)

    settings = settings_for(nats_server, tmp_path, recent_items=3)
    app = FeatureApp(settings)
    await app.start()

    async def applied():  # type: ignore[no-untyped-def]
        r = await user_features(app.port, "u2")
        return r if r.watermark.stream_sequence == len(events) else None

    response = await eventually(applied, what="all events applied")
    assert response.features.known
    assert response.watermark.event_time.seconds == 1_700_000_010
    assert response.watermark.lag.seconds > 0

    u1 = (await user_features(app.port, "u1")).features
    assert [i.item_id for i in u1.recent] == ["i4", "i3", "i2"]  # newest first, capped at 3
    assert u1.event_counts["EVENT_TYPE_CLICK"] == 5

    channel, feature = stub(app)
    try:
        popular = await feature.GetPopularItems(feature_pb2.GetPopularItemsRequest(k=2))
        # i4 has a click (weight 2) and a purchase (weight 5).
        assert [p.item_id for p in popular.items][0] == "i4"
        unknown = await feature.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id="nobody"))
        assert not unknown.features.known and not unknown.features.recent
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await feature.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id=""))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await channel.close()
    await app.stop()

    # A restart resumes from SQL and the durable consumer: same state, nothing applied twice.
    await publish(nats_client, [event("u1", "i9", event_id="late", at=1_700_000_020)])
    app = FeatureApp(settings)
    await app.start()

    async def late_applied():  # type: ignore[no-untyped-def]
        r = await user_features(app.port, "u1")
        return r if r.watermark.stream_sequence == len(events) + 1 else None

    restarted = (await eventually(late_applied, what="the late event applied")).features
    assert [i.item_id for i in restarted.recent] == ["i9", "i4", "i3"]
    assert restarted.event_counts["EVENT_TYPE_CLICK"] == 6
    await app.stop()
