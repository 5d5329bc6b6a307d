"""Retiring catalogue items in the feature service: hidden and available_until through gRPC and
NATS, DeleteItems (validation, tombstones on FRESHREC_CATALOG, SQL, popularity, item features),
and replicas with their own databases following a delete."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from freshrec.v1 import feature_pb2, item_pb2
from services.feature.catalogue import REVISION_HEADER, validate_item
from services.feature.settings import CatalogueSettings
from shared.nats import CATALOGUE_ITEMS_SUBJECT
from tests.conftest import eventually
from tests.factories import event
from tests.feature.helpers import T0, publish, settings_for, started, stub
from tests.feature.test_catalogue import catalogue_messages


def test_timestamps_and_tombstones_are_validated() -> None:
    bad_until = item_pb2.Item(item_id="m1")
    bad_until.available_until.seconds = 253_402_300_800
    assert validate_item(bad_until, CatalogueSettings()) == "available_until is not a valid timestamp"
    tombstone = item_pb2.Item(item_id="m1", deleted=True)
    assert "call DeleteItems" in (validate_item(tombstone, CatalogueSettings()) or "")
    past = item_pb2.Item(item_id="m1", hidden=True)
    past.available_until.seconds = 1  # already over: valid, served nowhere
    assert validate_item(past, CatalogueSettings()) is None


async def test_delete_items_refuses_bad_ids(nats_server, tmp_path: Path) -> None:
    app = await started(settings_for(nats_server, tmp_path))
    channel, feature = stub(app)
    try:
        for ids, reason in (
            ([], "item_ids is empty"),
            ([""], "item_ids has an empty id"),
            (["x" * 129], "item_ids has an id longer than 128"),
            ([f"m{n}" for n in range(1001)], "item_ids has 1001 ids"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await feature.DeleteItems(feature_pb2.DeleteItemsRequest(item_ids=ids))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason in (caught.value.details() or "")
    finally:
        await channel.close()
        await app.stop()


async def test_hidden_expired_and_deleted_items_leave_the_catalogue_answers(
    nats_server, nats_client, tmp_path: Path
) -> None:
    app = await started(settings_for(nats_server, tmp_path))
    channel, feature = stub(app)
    try:
        items = [item_pb2.Item(item_id=f"m{n}", title=f"Movie {n}", categories=["drama"]) for n in range(4)]
        await feature.UpsertItems(feature_pb2.UpsertItemsRequest(items=items))
        await publish(
            nats_client, [event(f"u{n}", f"m{m}", at=T0 + n) for n in range(4) for m in range(n + 1)]
        )

        async def ranked() -> list[str] | None:
            r = await feature.GetPopularItems(feature_pb2.GetPopularItemsRequest(k=10, category="drama"))
            return [p.item_id for p in r.items] if r.watermark.stream_sequence == 10 else None

        assert await eventually(ranked, what="popularity") == ["m0", "m1", "m2", "m3"]

        # m0 hidden over gRPC, m1 expired a moment ago through NATS: both leave popularity.
        hidden = item_pb2.Item(item_id="m0", title="Movie 0", categories=["drama"], hidden=True)
        await feature.UpsertItems(feature_pb2.UpsertItemsRequest(items=[hidden]))
        expired = item_pb2.Item(item_id="m1", title="Movie 1", categories=["drama"])
        expired.available_until.FromSeconds(int(time.time()) - 1)
        await nats_client.jetstream().publish(CATALOGUE_ITEMS_SUBJECT, expired.SerializeToString())
        # m2 expires later: it is served until then, with no catalogue change needed after.
        soon = item_pb2.Item(item_id="m2", title="Movie 2", categories=["drama"])
        soon.available_until.FromNanoseconds(int((time.time() + 1.5) * 1e9))
        await feature.UpsertItems(feature_pb2.UpsertItemsRequest(items=[soon]))

        async def without_hidden_and_expired() -> bool:
            r = await feature.GetPopularItems(feature_pb2.GetPopularItemsRequest(k=10))
            return [p.item_id for p in r.items] == ["m2", "m3"]

        await eventually(without_hidden_and_expired, what="hidden and expired items left out")

        async def m2_expired() -> bool:
            r = await feature.GetPopularItems(feature_pb2.GetPopularItemsRequest(k=10))
            return [p.item_id for p in r.items] == ["m3"]

        await eventually(m2_expired, what="m2 left out once its time passed")
        listed = await feature.ListItems(feature_pb2.ListItemsRequest())
        shown = {i.item_id: (i.hidden, i.HasField("available_until")) for i in listed.items}
        assert shown == {"m0": (True, False), "m1": (False, True), "m2": (False, True), "m3": (False, False)}

        # Delete m3 and an unknown id: the unknown one is reported, m3 is gone everywhere.
        response = await feature.DeleteItems(feature_pb2.DeleteItemsRequest(item_ids=["m3", "nope"]))
        assert response.deleted == 1 and list(response.missing_item_ids) == ["nope"]
        got = await feature.GetItems(feature_pb2.GetItemsRequest(item_ids=["m3", "m0"]))
        assert [i.item_id for i in got.items] == ["m0"] and list(got.missing_item_ids) == ["m3"]
        assert "m3" not in [
            i.item_id for i in (await feature.ListItems(feature_pb2.ListItemsRequest())).items
        ]
        popular = await feature.GetPopularItems(feature_pb2.GetPopularItemsRequest(k=10))
        assert [p.item_id for p in popular.items] == []
        stats = await feature.GetItemFeatures(feature_pb2.GetItemFeaturesRequest(item_ids=["m3", "m0"]))
        assert [(i.item_id, i.known) for i in stats.items] == [("m3", False), ("m0", True)]
        again = await feature.DeleteItems(feature_pb2.DeleteItemsRequest(item_ids=["m3"]))
        assert again.deleted == 0 and list(again.missing_item_ids) == ["m3"]

        # The tombstone is on the catalogue stream at the entry's next revision.
        msgs = await catalogue_messages(nats_client, 8)
        last = item_pb2.Item.FromString(msgs[-1].data)
        assert (last.item_id, last.deleted, last.title, msgs[-1].headers[REVISION_HEADER]) == (
            "m3",
            True,
            "",
            "2",
        )

        # Unhiding brings m0 back; a re-upsert of m3 continues its revisions (a new item, no stats).
        await feature.UpsertItems(
            feature_pb2.UpsertItemsRequest(
                items=[item_pb2.Item(item_id="m0", categories=["drama"]), item_pb2.Item(item_id="m3")]
            )
        )
        back = await feature.GetPopularItems(feature_pb2.GetPopularItemsRequest(k=10))
        assert [p.item_id for p in back.items] == ["m0"]
        msgs = await catalogue_messages(nats_client, 10)
        assert msgs[-1].headers[REVISION_HEADER] == "3"
    finally:
        await channel.close()
        await app.stop()

    # A restart loads the same catalogue view from SQL.
    app = await started(settings_for(nats_server, tmp_path))
    try:
        assert app.state is not None
        assert "m3" not in app.state.items and app.state.hidden_items == set()
        assert set(app.state.available_until) == {"m1", "m2"}
    finally:
        await app.stop()


async def test_a_delete_reaches_a_replica_with_its_own_database(
    nats_server, nats_client, tmp_path: Path
) -> None:
    one = await started(settings_for(nats_server, tmp_path, "one", consumer_name="one"))
    two = await started(settings_for(nats_server, tmp_path, "two", consumer_name="two"))
    channel_one, feature_one = stub(one)
    channel_two, feature_two = stub(two)
    try:
        await feature_one.UpsertItems(
            feature_pb2.UpsertItemsRequest(items=[item_pb2.Item(item_id="gone", categories=["x"])])
        )

        async def on_two() -> bool:
            r = await feature_two.GetItems(feature_pb2.GetItemsRequest(item_ids=["gone"]))
            return len(r.items) == 1

        await eventually(on_two, what="replica two storing the item")
        await feature_one.DeleteItems(feature_pb2.DeleteItemsRequest(item_ids=["gone"]))

        async def gone_on_two() -> bool:
            r = await feature_two.GetItems(feature_pb2.GetItemsRequest(item_ids=["gone"]))
            assert two.state is not None
            return not r.items and "gone" not in two.state.item_categories

        await eventually(gone_on_two, what="replica two following the delete")
    finally:
        await channel_one.close()
        await channel_two.close()
        await one.stop()
        await two.stop()
