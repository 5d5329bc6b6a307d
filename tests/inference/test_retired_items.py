"""Retired items on real parts: hidden, time-limited and deleted items go through the feature
service's UpsertItems / DeleteItems, the catalogue stream, into every inference replica, and out
of every answer (Recommend with exploration, ScoreItems, SimilarItems) before any new model."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from freshrec.v1 import event_pb2, feature_pb2, feature_pb2_grpc, inference_pb2, item_pb2
from tests.conftest import eventually
from tests.factories import event
from tests.inference.artifacts import catalogue_items, write
from tests.inference.conftest import publish_events, recent_items, upsert_items, wait_serving

N_ITEMS = 120


@pytest.fixture
async def replicas(start_inference, store, nats_client, feature) -> Any:
    """Two inference replicas serving one model; the catalogue came only through UpsertItems."""
    write(store, "v000001", item_tower=True)
    store.set_live("v000001")
    await upsert_items(feature.port, catalogue_items())
    history = [
        event("u1", "alpha-1", event_id="h1", at=1_700_000_001),
        event("u1", "alpha-2", event_id="h2", at=1_700_000_002, type=event_pb2.EVENT_TYPE_PURCHASE),
    ]
    await publish_events(nats_client, history)

    async def applied() -> bool:
        return len(await recent_items(feature.port, "u1")) == 2

    await eventually(applied, what="u1's history in the feature service")
    stubs = []
    for _ in range(2):
        app, stub = await start_inference(new_item_window_s=3600.0)
        await wait_serving(stub, "v000001")

        async def caught_up(app: Any = app) -> bool:
            state = app.holder.state
            return (
                len(app.holder.catalogue.items) == N_ITEMS
                and state.catalogue_version == app.holder.catalogue.version
            )

        await eventually(caught_up, what="the catalogue in the serving state")
        stubs.append((app, stub))
    return stubs


def changed(item_id: str, **fields: Any) -> item_pb2.Item:
    """The catalogue entry of ``item_id`` with some fields changed."""
    entry = next(i for i in catalogue_items() if i.item_id == item_id)
    for name, value in fields.items():
        if name == "available_until":
            entry.available_until.FromNanoseconds(int(value * 1e9))
        else:
            setattr(entry, name, value)
    return entry


async def everything(stub: Any) -> set[str]:
    """Every item id any answer of this replica contains for u1 and a newcomer."""
    shown: set[str] = set()
    for user in ("u1", "nobody"):
        for exploration in (0.0, 1.0):
            r = await stub.Recommend(
                inference_pb2.RecommendRequest(user_id=user, k=N_ITEMS, exploration=exploration)
            )
            shown |= {i.item_id for i in r.items}
    similar = await stub.SimilarItems(inference_pb2.SimilarItemsRequest(item_id="alpha-7", k=N_ITEMS))
    return shown | {i.item_id for i in similar.items}


async def top_of(stub: Any) -> str:
    r = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=1))
    return str(r.items[0].item_id)


async def test_a_hidden_item_leaves_every_answer_of_every_replica_and_comes_back(replicas, feature) -> None:
    stubs = [stub for _, stub in replicas]
    top = await top_of(stubs[0])
    assert [top in await everything(stub) for stub in stubs] == [True, True]
    await upsert_items(feature.port, [changed(top, hidden=True)])

    async def gone_everywhere() -> bool:
        return [top in await everything(stub) for stub in stubs] == [False, False]

    await eventually(gone_everywhere, what=f"{top} out of every replica's answers")
    for stub in stubs:
        scored = await stub.ScoreItems(
            inference_pb2.ScoreItemsRequest(user_id="u1", item_ids=[top, "alpha-9"])
        )
        assert list(scored.unavailable_item_ids) == [top] and [s.item_id for s in scored.scores] == [
            "alpha-9"
        ]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SimilarItems(inference_pb2.SimilarItemsRequest(item_id=top, k=5))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "hidden" in (caught.value.details() or "")
        r = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=20))
        assert all(top not in i.reason for i in r.items)

    await upsert_items(feature.port, [changed(top)])

    async def back() -> bool:
        return [await top_of(stub) for stub in stubs] == [top, top]

    await eventually(back, what=f"{top} recommended again once unhidden")


async def test_an_item_expires_when_its_time_passes_without_a_catalogue_event(replicas, feature) -> None:
    app, stub = replicas[0]
    top = await top_of(stub)
    await upsert_items(feature.port, [changed(top, available_until=time.time() + 2.0)])

    async def limited() -> bool:
        state = app.holder.state
        return bool(len(state.expiry_at))

    await eventually(limited, what="the time limit in the serving state")
    version = app.holder.catalogue.version
    assert await top_of(stub) == top or time.time() >= app.holder.state.expiry_at[0]

    async def expired() -> bool:
        return top not in await everything(stub)

    await eventually(expired, what=f"{top} out of answers once its available_until passed")
    assert app.holder.catalogue.version == version  # no catalogue event was needed
    scored = await stub.ScoreItems(inference_pb2.ScoreItemsRequest(user_id="u1", item_ids=[top]))
    assert list(scored.unavailable_item_ids) == [top]


async def test_a_deleted_item_is_never_served_though_the_model_still_has_it(replicas, feature) -> None:
    stubs = [stub for _, stub in replicas]
    top = await top_of(stubs[0])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{feature.port}") as channel:
        response = await feature_pb2_grpc.FeatureServiceStub(channel).DeleteItems(
            feature_pb2.DeleteItemsRequest(item_ids=[top])
        )
    assert response.deleted == 1

    async def gone_everywhere() -> bool:
        return [top in await everything(stub) for stub in stubs] == [False, False]

    await eventually(gone_everywhere, what=f"{top} out of every replica's answers")
    app, stub = replicas[0]
    assert top in app.holder.state.model.item_rows and top not in app.holder.catalogue.items
    scored = await stub.ScoreItems(inference_pb2.ScoreItemsRequest(user_id="u1", item_ids=[top]))
    assert list(scored.unavailable_item_ids) == [top]


async def test_without_a_model_a_hidden_item_leaves_the_popular_answers(
    start_inference, nats_client, feature
) -> None:
    await upsert_items(feature.port, [item_pb2.Item(item_id="hit"), item_pb2.Item(item_id="other")])
    await publish_events(
        nats_client,
        [event("a", "hit", event_id="1"), event("b", "hit", event_id="2"), event("c", "other", event_id="3")],
    )
    _app, stub = await start_inference()

    async def answered(expected: list[str]) -> bool:
        r = await stub.Recommend(inference_pb2.RecommendRequest(user_id="new", k=2))
        return [i.item_id for i in r.items] == expected

    await eventually(lambda: answered(["hit", "other"]), what="popular items")
    await upsert_items(feature.port, [item_pb2.Item(item_id="hit", hidden=True)])
    await eventually(lambda: answered(["other"]), what="the hidden item out of the popular answer")
