"""The feature service on real parts: events published to FRESHREC_EVENTS (as ingestion does)
are applied exactly once, served over gRPC, and survive a restart."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from freshrec.v1 import event_pb2, feature_pb2, feature_pb2_grpc, item_pb2
from services.feature.server import FeatureApp
from services.feature.settings import FeatureSettings
from shared.nats import MSG_ID_HEADER, accepted_subject, ensure_events_stream
from tests.conftest import eventually, service_settings
from tests.factories import event


async def publish(nats_client, events: list[event_pb2.Event]) -> None:  # type: ignore[no-untyped-def]
    js = nats_client.jetstream()
    await ensure_events_stream(js)
    for e in events:
        subject = accepted_subject(event_pb2.EventType.Name(e.type), e.user_id)
        await js.publish(subject, e.SerializeToString(), headers={MSG_ID_HEADER: e.event_id})


async def user_features(port: int, user: str) -> feature_pb2.GetUserFeaturesResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await feature_pb2_grpc.FeatureServiceStub(channel).GetUserFeatures(
            feature_pb2.GetUserFeaturesRequest(user_id=user)
        )


@pytest.fixture
def settings(nats_server, tmp_path: Path) -> FeatureSettings:
    return service_settings(FeatureSettings, nats_server, tmp_path, recent_items=3)


async def test_features_follow_the_stream_and_survive_restart(settings, nats_client) -> None:
    events = [event("u1", f"i{n}", event_id=f"e{n}", at=1_700_000_000 + n) for n in range(5)]
    events.append(event("u2", "i4", event_id="p1", type=event_pb2.EVENT_TYPE_PURCHASE, at=1_700_000_010))
    await publish(nats_client, events)

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

    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = feature_pb2_grpc.FeatureServiceStub(channel)
        popular = await stub.GetPopularItems(feature_pb2.GetPopularItemsRequest(k=2))
        # i4 has a click (weight 2) and a purchase (weight 5).
        assert [p.item_id for p in popular.items][0] == "i4"
        unknown = await stub.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id="nobody"))
        assert not unknown.features.known and not unknown.features.recent
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id=""))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await app.stop()

    # A restart resumes from SQL and the durable consumer: same state, nothing applied twice.
    await publish(nats_client, [event("u1", "i9", event_id="late", at=1_700_000_020)])
    app = FeatureApp(settings)
    await app.start()

    async def caught_up():  # type: ignore[no-untyped-def]
        r = await user_features(app.port, "u1")
        return r if r.watermark.stream_sequence == len(events) + 1 else None

    restarted = (await eventually(caught_up, what="the late event applied")).features
    assert [i.item_id for i in restarted.recent] == ["i9", "i4", "i3"]
    assert restarted.event_counts["EVENT_TYPE_CLICK"] == 6
    await app.stop()


async def test_catalogue_upsert_validation_and_listing(settings) -> None:
    app = FeatureApp(settings)
    await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = feature_pb2_grpc.FeatureServiceStub(channel)
        items = [item_pb2.Item(item_id=f"m{n}", title=f"Movie {n}", categories=["drama"]) for n in range(5)]
        items.append(item_pb2.Item(item_id="", title="nameless"))
        response = await stub.UpsertItems(feature_pb2.UpsertItemsRequest(items=items))
        assert response.upserted == 5
        assert [(e.index, e.reason) for e in response.errors] == [(5, "item_id is empty")]

        got = await stub.GetItems(feature_pb2.GetItemsRequest(item_ids=["m1", "zz"]))
        assert [i.title for i in got.items] == ["Movie 1"] and list(got.missing_item_ids) == ["zz"]

        page = await stub.ListItems(feature_pb2.ListItemsRequest(page_size=3))
        rest = await stub.ListItems(
            feature_pb2.ListItemsRequest(page_size=3, page_token=page.next_page_token)
        )
        assert [i.item_id for i in page.items] + [i.item_id for i in rest.items] == [
            f"m{n}" for n in range(5)
        ]
        assert rest.next_page_token == ""
    await app.stop()
