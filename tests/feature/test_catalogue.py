"""The catalogue: every validation rule, gRPC and NATS intake (protobuf and JSON), the DLQ,
publication to FRESHREC_CATALOG with revisions, the outbox relay, and replicas following it."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from freshrec.v1 import feature_pb2, item_pb2
from services.feature.catalogue import (
    DLQ_STREAM,
    DLQ_SUBJECT,
    REASON_HEADER,
    REVISION_HEADER,
    TYPE_HEADER,
    decode_items,
    validate_item,
)
from services.feature.settings import CatalogueSettings
from shared.nats import CATALOGUE_ACCEPTED_SUBJECT, CATALOGUE_ITEMS_SUBJECT, CATALOGUE_STREAM
from tests.conftest import eventually
from tests.factories import event
from tests.feature.helpers import T0, publish, settings_for, started, stub

LIMITS = CatalogueSettings()
NOW = 1_800_000_000.0


def item(**fields) -> item_pb2.Item:  # type: ignore[no-untyped-def]
    fields.setdefault("item_id", "m1")
    return item_pb2.Item(**fields)


def future(seconds: float) -> item_pb2.Item:
    i = item()
    i.created_at.seconds = int(NOW + seconds)
    return i


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (item(item_id=""), "item_id is empty"),
        (item(item_id="x" * 129), "item_id longer than 128"),
        (item(item_id="a\nb"), "item_id contains control characters"),
        (item(title="t" * 513), "title longer than 512"),
        (item(title="a\x00b"), "title contains control characters"),
        (item(description="d" * 10_001), "description longer than 10000"),
        (item(description="bell\x07"), "description contains control characters"),
        (item(categories=[f"c{n}" for n in range(33)]), "more than 32 categories"),
        (item(categories=["ok", ""]), "categories has an empty entry"),
        (item(categories=["c" * 65]), "categories entry longer than 64"),
        (item(categories=["a\tb"]), "categories entry contains control characters"),
        (item(tags=[f"t{n}" for n in range(65)]), "more than 64 tags"),
        (item(tags=[""]), "tags has an empty entry"),
        (item(attributes={f"k{n}": "v" for n in range(65)}), "more than 64 attributes"),
        (item(attributes={"": "v"}), "attributes has an empty key"),
        (item(attributes={"k" * 65: "v"}), "attribute key longer than 64"),
        (item(attributes={"year": "v" * 1025}), "attribute 'year' longer than 1024"),
        (item(attributes={"k": "\x01"}), "attribute 'k' contains control characters"),
        (future(301), "created_at is more than 300 s in the future"),
    ],
)
def test_every_validation_rule_has_its_reason(bad: item_pb2.Item, reason: str) -> None:
    assert validate_item(bad, LIMITS, now=NOW) == reason


def test_valid_items_pass() -> None:
    good = item(
        title="Heat (1995)",
        description="A thief.\nA detective.\tLA.",
        categories=["Crime", "Thriller"],
        tags=["heist"],
        attributes={"year": "1995", "note": "two lines\nare fine"},
    )
    good.created_at.seconds = int(NOW + 299)
    assert validate_item(good, LIMITS, now=NOW) is None


def test_decoding_protobuf_and_json_messages() -> None:
    one = item(item_id="solo", title="Solo", categories=["x"])
    batch = feature_pb2.UpsertItemsRequest(items=[item(item_id="a"), item(item_id="b", tags=["t"])])
    assert decode_items(one.SerializeToString(), None) == ([one], None)
    assert decode_items(batch.SerializeToString(), {}) == (list(batch.items), None)
    assert decode_items(one.SerializeToString(), {TYPE_HEADER: "freshrec.v1.Item"}) == ([one], None)
    assert decode_items(batch.SerializeToString(), {TYPE_HEADER: "freshrec.v1.UpsertItemsRequest"})[
        0
    ] == list(batch.items)
    as_json = {"Content-Type": "application/json"}
    assert decode_items(json.dumps({"itemId": "j", "categories": ["c"]}).encode(), as_json) == (
        [item(item_id="j", categories=["c"])],
        None,
    )
    assert decode_items(json.dumps({"items": [{"itemId": "k"}]}).encode(), as_json) == (
        [item(item_id="k")],
        None,
    )
    for data, headers, reason in [
        (b"\xff\xff\xff", None, "not a protobuf freshrec.v1.Item or UpsertItemsRequest"),
        (b"{", as_json, "not valid JSON"),
        (b"[1]", as_json, "JSON message is not an object"),
        (
            json.dumps({"itemId": "j", "colour": "red"}).encode(),
            as_json,
            "not a freshrec.v1.Item in the proto JSON",
        ),
        (b"", {TYPE_HEADER: "freshrec.v1.Event"}, "unknown Freshrec-Message-Type"),
    ]:
        items, why = decode_items(data, headers)
        assert items == [] and why is not None and why.startswith(reason), why


async def catalogue_messages(nats_client, expected: int) -> list:  # type: ignore[no-untyped-def]
    js = nats_client.jetstream()
    sub = await js.subscribe(
        CATALOGUE_ACCEPTED_SUBJECT,
        stream=CATALOGUE_STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    msgs: list = []

    async def got() -> bool:
        try:
            msgs.append(await sub.next_msg(timeout=0.2))
        except Exception:
            return False
        return len(msgs) >= expected

    await eventually(got, what=f"{expected} messages on {CATALOGUE_STREAM}")
    await sub.unsubscribe()
    return msgs


async def test_grpc_upsert_stores_publishes_and_feeds_popularity(
    nats_server, nats_client, tmp_path: Path
) -> None:
    app = await started(settings_for(nats_server, tmp_path))
    channel, feature = stub(app)
    try:
        items = [
            item(item_id=f"m{n}", title=f"Movie {n}", categories=["drama" if n % 2 else "comedy"])
            for n in range(4)
        ]
        items.insert(2, item(item_id="bad\n"))
        response = await feature.UpsertItems(feature_pb2.UpsertItemsRequest(items=items))
        assert response.upserted == 4
        assert [(e.index, e.reason) for e in response.errors] == [(2, "item_id contains control characters")]
        again = await feature.UpsertItems(
            feature_pb2.UpsertItemsRequest(items=[item(item_id="m1", title="Renamed", categories=["drama"])])
        )
        assert again.upserted == 1

        msgs = await catalogue_messages(nats_client, 5)
        got = [(item_pb2.Item.FromString(m.data).item_id, m.headers[REVISION_HEADER]) for m in msgs]
        assert got == [("m0", "1"), ("m1", "1"), ("m2", "1"), ("m3", "1"), ("m1", "2")]
        assert item_pb2.Item.FromString(msgs[-1].data).title == "Renamed"
        fetched = await feature.GetItems(feature_pb2.GetItemsRequest(item_ids=["m1", "bad\n"]))
        assert [i.title for i in fetched.items] == ["Renamed"] and list(fetched.missing_item_ids) == ["bad\n"]

        await publish(
            nats_client,
            [event("u1", "m1", at=T0), event("u2", "m2", at=T0 + 1), event("u3", "m1", at=T0 + 2)],
        )

        async def drama():  # type: ignore[no-untyped-def]
            r = await feature.GetPopularItems(feature_pb2.GetPopularItemsRequest(k=5, category="drama"))
            return r.watermark.stream_sequence == 3 and [p.item_id for p in r.items]

        assert await eventually(drama, what="drama items ranked") == ["m1"]
        comedy = await feature.GetPopularItems(
            feature_pb2.GetPopularItemsRequest(
                k=5, category="comedy", window=feature_pb2.POPULARITY_WINDOW_TRENDING
            )
        )
        assert [(p.item_id, p.score) for p in comedy.items] == [("m2", 2.0)]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await feature.UpsertItems(
                feature_pb2.UpsertItemsRequest(items=[item(item_id=f"x{n}") for n in range(1001)])
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await channel.close()
        await app.stop()


async def test_nats_intake_accepts_protobuf_and_json_and_dead_letters_the_rest(
    nats_server, nats_client, tmp_path: Path
) -> None:
    app = await started(settings_for(nats_server, tmp_path))
    channel, feature = stub(app)
    try:
        js = nats_client.jetstream()
        await js.publish(CATALOGUE_ITEMS_SUBJECT, item(item_id="p1", categories=["a"]).SerializeToString())
        batch = feature_pb2.UpsertItemsRequest(items=[item(item_id="p2"), item(item_id="", title="nameless")])
        await js.publish(CATALOGUE_ITEMS_SUBJECT, batch.SerializeToString())
        await js.publish(
            CATALOGUE_ITEMS_SUBJECT,
            json.dumps({"itemId": "j1", "title": "From JSON", "tags": ["t"]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        await js.publish(CATALOGUE_ITEMS_SUBJECT, b"\xff\x00garbage")

        async def stored():  # type: ignore[no-untyped-def]
            r = await feature.GetItems(feature_pb2.GetItemsRequest(item_ids=["p1", "p2", "j1"]))
            return r if len(r.items) == 3 else None

        found = await eventually(stored, what="items from NATS stored")
        assert [i.title for i in found.items] == ["", "", "From JSON"]

        dlq = await js.subscribe(
            DLQ_SUBJECT, stream=DLQ_STREAM, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        )
        reasons = []

        async def two_dead() -> bool:
            try:
                reasons.append((await dlq.next_msg(timeout=0.2)).headers[REASON_HEADER])
            except Exception:
                return False
            return len(reasons) == 2

        await eventually(two_dead, what="two dead letters")
        assert "item_id is empty" in reasons
        assert any(r.startswith("not a protobuf freshrec.v1.Item") for r in reasons)
        await dlq.unsubscribe()
    finally:
        await channel.close()
        await app.stop()


async def test_replicas_with_their_own_databases_follow_the_catalogue(
    nats_server, nats_client, tmp_path: Path
) -> None:
    one = await started(settings_for(nats_server, tmp_path, "one", consumer_name="one"))
    two = await started(settings_for(nats_server, tmp_path, "two", consumer_name="two"))
    channel_one, feature_one = stub(one)
    channel_two, feature_two = stub(two)
    try:
        await feature_one.UpsertItems(
            feature_pb2.UpsertItemsRequest(items=[item(item_id="shared", categories=["x"])])
        )

        async def on_two():  # type: ignore[no-untyped-def]
            r = await feature_two.GetItems(feature_pb2.GetItemsRequest(item_ids=["shared"]))
            return r.items

        assert [i.categories[0] for i in await eventually(on_two, what="replica two storing the item")] == [
            "x"
        ]
        assert two.state is not None and two.state.item_categories["shared"] == ("x",)
        # A newer revision through replica two reaches replica one.
        await feature_two.UpsertItems(
            feature_pb2.UpsertItemsRequest(items=[item(item_id="shared", categories=["y"])])
        )

        async def on_one() -> bool:
            assert one.state is not None
            return one.state.item_categories.get("shared") == ("y",)

        await eventually(on_one, what="replica one following the update")
        await two.stop()
        # Replica two restarts from its stored follower position and keeps up.
        await feature_one.UpsertItems(
            feature_pb2.UpsertItemsRequest(items=[item(item_id="later", categories=["z"])])
        )
        two = await started(settings_for(nats_server, tmp_path, "two", consumer_name="two"))

        async def later_on_two() -> bool:
            assert two.state is not None
            return two.state.item_categories.get("later") == ("z",) and two.state.item_categories[
                "shared"
            ] == ("y",)

        await eventually(later_on_two, what="replica two catching up after a restart")
    finally:
        await channel_one.close()
        await channel_two.close()
        await one.stop()
        await two.stop()


@pytest.mark.slow
async def test_items_stored_while_nats_is_down_are_published_when_it_returns(
    nats_server, nats_client, tmp_path: Path
) -> None:
    app = await started(settings_for(nats_server, tmp_path, catalogue={"relay_interval_s": 0.2}))
    channel, feature = stub(app)
    try:
        nats_server.stop()
        response = await feature.UpsertItems(feature_pb2.UpsertItemsRequest(items=[item(item_id="offline")]))
        assert response.upserted == 1  # stored in SQL; publishing waits for NATS
        nats_server.start()
        msgs = await catalogue_messages(nats_client, 1)
        assert item_pb2.Item.FromString(msgs[0].data).item_id == "offline"
    finally:
        await channel.close()
        await app.stop()


async def test_catalogue_upsert_validation_and_listing(nats_server, tmp_path: Path) -> None:
    app = await started(settings_for(nats_server, tmp_path))
    channel, feature = stub(app)
    try:
        items = [item_pb2.Item(item_id=f"m{n}", title=f"Movie {n}", categories=["drama"]) for n in range(5)]
        items.append(item_pb2.Item(item_id="", title="nameless"))
        response = await feature.UpsertItems(feature_pb2.UpsertItemsRequest(items=items))
        assert response.upserted == 5
        assert [(e.index, e.reason) for e in response.errors] == [(5, "item_id is empty")]

        got = await feature.GetItems(feature_pb2.GetItemsRequest(item_ids=["m1", "zz"]))
        assert [i.title for i in got.items] == ["Movie 1"] and list(got.missing_item_ids) == ["zz"]

        page = await feature.ListItems(feature_pb2.ListItemsRequest(page_size=3))
        rest = await feature.ListItems(
            feature_pb2.ListItemsRequest(page_size=3, page_token=page.next_page_token)
        )
        assert [i.item_id for i in page.items] + [i.item_id for i in rest.items] == [
            f"m{n}" for n in range(5)
        ]
        assert rest.next_page_token == ""
    finally:
        await channel.close()
        await app.stop()
