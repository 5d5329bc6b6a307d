"""Recommend's options on real parts: the feature service fed through JetStream, the catalogue
followed from FRESHREC_CATALOG, ONNX models built by tests.inference.artifacts."""

from __future__ import annotations

import time
from typing import Any

import grpc
import numpy as np
import pytest

from freshrec.v1 import event_pb2, inference_pb2, item_pb2
from tests.conftest import eventually
from tests.factories import event
from tests.inference.artifacts import catalogue_items, category_of, write
from tests.inference.conftest import publish_events, publish_items, recent_items, upsert_items, wait_serving

MODEL = inference_pb2.RECOMMENDATION_SOURCE_MODEL
EXPLORATION = inference_pb2.RECOMMENDATION_SOURCE_EXPLORATION
COLD_START = inference_pb2.RECOMMENDATION_SOURCE_COLD_START


@pytest.fixture
async def served(start_inference, store, nats_client, feature) -> Any:
    """Inference with a model and the full catalogue; user u1 clicked three alpha items."""
    write(store, "v000001", item_tower=True)
    store.set_live("v000001")
    await upsert_items(feature.port, catalogue_items())
    await publish_items(nats_client, catalogue_items())
    history = [
        event("u1", "alpha-1", event_id="h1", at=1_700_000_001),
        event("u1", "alpha-2", event_id="h2", at=1_700_000_002, type=event_pb2.EVENT_TYPE_PURCHASE),
        event("u1", "alpha-3", event_id="h3", at=1_700_000_003),
    ]
    await publish_events(nats_client, history)

    async def applied() -> bool:
        return len(await recent_items(feature.port, "u1")) == 3

    await eventually(applied, what="u1's history in the feature service")
    app, stub = await start_inference(new_item_window_s=3600.0)
    await wait_serving(stub, "v000001")

    async def catalogue_known() -> bool:
        return app.holder.state is not None and app.holder.state.catalogue_version >= 120

    await eventually(catalogue_known, what="the catalogue in the serving state")
    return app, stub


def ids(response: Any) -> list[str]:
    return [i.item_id for i in response.items]


async def test_model_answers_exclude_seen_items_and_explain_themselves(served) -> None:
    _app, stub = served
    response = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=10))
    assert response.model_version == "v000001" and response.trained_through.stream_sequence == 42
    assert len(response.items) == 10
    assert all(i.source == MODEL for i in response.items)
    assert not {"alpha-1", "alpha-2", "alpha-3"} & set(ids(response))
    assert all(category_of(i) == "alpha" for i in ids(response))  # the user's taste
    scores = [i.score for i in response.items]
    assert scores == sorted(scores, reverse=True)
    # The reason names the user's recent item closest to the result, with what the user did.
    assert all(i.reason.startswith("because you recently") for i in response.items)
    assert any("bought “Item alpha-2”" in i.reason for i in response.items)

    with_seen = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=40, include_seen=True))
    assert {"alpha-1", "alpha-2", "alpha-3"} <= set(ids(with_seen))
    top = ids(response)[:2]
    excluded = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=10, exclude_item_ids=top))
    assert not set(top) & set(ids(excluded)) and len(excluded.items) == 10


async def test_category_filter(served) -> None:
    _app, stub = served
    response = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=10, categories=["gamma"]))
    assert len(response.items) == 10 and {category_of(i) for i in ids(response)} == {"gamma"}
    both = await stub.Recommend(
        inference_pb2.RecommendRequest(user_id="u1", k=50, categories=["gamma", "delta"])
    )
    assert len(both.items) == 50 and {category_of(i) for i in ids(both)} == {"gamma", "delta"}
    none = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=10, categories=["unheard-of"]))
    assert not none.items and none.model_version == "v000001"


async def test_diversity_trades_relevance_for_variety(served) -> None:
    app, stub = served
    state = app.holder.state

    def spread(response: Any) -> tuple[int, float]:
        positions = state.positions(ids(response))
        unit = state.unit_embeddings(positions)
        similarity = unit @ unit.T
        mean_pairwise = (similarity.sum() - len(positions)) / (len(positions) * (len(positions) - 1))
        return len({category_of(i) for i in ids(response)}), float(mean_pairwise)

    plain = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=10))
    diverse = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=10, diversity=0.8))
    plain_categories, plain_similarity = spread(plain)
    diverse_categories, diverse_similarity = spread(diverse)
    assert plain_categories == 1 and diverse_categories >= 3
    assert diverse_similarity < plain_similarity - 0.2
    assert ids(diverse)[0] == ids(plain)[0]  # MMR starts from the most relevant item
    assert all(i.source == MODEL for i in diverse.items) and len(diverse.items) == 10
    slight = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=10, diversity=0.05))
    assert spread(slight)[1] >= diverse_similarity


async def test_exploration_gives_marked_slots_to_new_or_under_exposed_items(served, nats_client) -> None:
    app, stub = served
    response = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=10, exploration=0.3))
    explored = [i for i in response.items if i.source == EXPLORATION]
    assert len(response.items) == 10 and len(explored) == 3
    positions = [n for n, i in enumerate(response.items) if i.source == EXPLORATION]
    assert positions != [7, 8, 9]  # spread through the list, not appended
    assert all(i.reason.startswith("exploring: rarely shown") for i in explored)
    assert not {"alpha-1", "alpha-2", "alpha-3"} & set(ids(response))
    assert len(set(ids(response))) == 10

    # Items shown a lot stop counting as under-exposed: exploration moves on to others.
    state = app.holder.state
    shown_often = set(ids(response))
    for _ in range(3):
        await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=10, exploration=0.3))
    assert int(state.impressions[state.positions(sorted(shown_often))].min()) >= 1

    # Catalogue items created just now are new: one the model does not know yet, and a known one
    # whose catalogue entry was just (re)created.
    now = int(time.time())
    unknown = item_pb2.Item(item_id="epsilon-new", title="Brand new", categories=["beta"], tags=["red"])
    renewed = item_pb2.Item(
        item_id="beta-5", title="Beta five, relaunched", categories=["beta"], tags=["red"]
    )
    for item in (unknown, renewed):
        item.created_at.FromSeconds(now)
    await publish_items(nats_client, [unknown, renewed])

    async def known() -> bool:
        state = app.holder.state
        return state.position("epsilon-new") > 0 and state.catalogue["beta-5"].created_at == now

    await eventually(known, what="the new items in the serving state")
    others = [f"beta-{n}" for n in range(30) if n != 5]
    picked = await stub.Recommend(
        inference_pb2.RecommendRequest(
            user_id="u1", k=2, exploration=1.0, categories=["beta"], exclude_item_ids=others
        )
    )
    reasons = {i.item_id: i.reason for i in picked.items if i.source == EXPLORATION}
    assert set(reasons) == {"epsilon-new", "beta-5"}
    assert reasons["epsilon-new"].startswith("exploring: new in the catalogue, not yet in model v000001")
    assert reasons["beta-5"].startswith("exploring: new in the catalogue (added ")


async def test_a_catalogue_item_added_seconds_ago_is_recommended_through_its_content(
    served, nats_client
) -> None:
    app, stub = served
    newcomer = item_pb2.Item(
        item_id="alpha-newcomer", title="Fresh alpha", categories=["alpha"], tags=["blue"]
    )
    newcomer.created_at.FromSeconds(int(time.time()))
    await publish_items(nats_client, [newcomer])

    async def recommended() -> Any:
        response = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=30))
        return response if "alpha-newcomer" in ids(response) else None

    response = await eventually(recommended, what="the new item among u1's recommendations")
    item = next(i for i in response.items if i.item_id == "alpha-newcomer")
    assert item.source == MODEL and "a new item, scored from its content" in item.reason
    assert response.model_version == "v000001"  # no new model was needed
    scored = await stub.ScoreItems(inference_pb2.ScoreItemsRequest(user_id="u1", item_ids=["alpha-newcomer"]))
    assert scored.scores[0].score == pytest.approx(item.score, rel=1e-5)
    similar = await stub.SimilarItems(inference_pb2.SimilarItemsRequest(item_id="alpha-newcomer", k=5))
    assert all(category_of(i) == "alpha" for i in ids(similar))
    assert all("both in alpha" in i.reason for i in similar.items)


async def test_cold_start_gets_popular_items_per_category(served, nats_client, feature) -> None:
    _app, stub = served
    await publish_events(
        nats_client,
        [event(f"p{n}", item, event_id=f"pop{n}-{item}") for n in range(3) for item in ("beta-7", "gamma-4")]
        + [event("p9", "beta-9", event_id="pop9")],
    )

    async def popular() -> Any:
        response = await stub.Recommend(inference_pb2.RecommendRequest(user_id="newcomer", k=3))
        return response if ids(response)[:2] in (["beta-7", "gamma-4"], ["gamma-4", "beta-7"]) else None

    response = await eventually(popular, what="popular items for a newcomer")
    assert all(i.source == COLD_START for i in response.items)
    assert response.items[0].reason.startswith(("trending", "popular"))
    assert response.model_version == "v000001"

    async def per_category() -> Any:
        r = await stub.Recommend(
            inference_pb2.RecommendRequest(user_id="newcomer", k=2, context={"category": "beta"})
        )
        return r if ids(r) == ["beta-7", "beta-9"] else None

    in_beta = await eventually(per_category, what="popular items in the context's category")
    assert "in beta" in in_beta.items[0].reason
    # Fewer popular items than asked: the model's view of a newcomer fills the list.
    many = await stub.Recommend(inference_pb2.RecommendRequest(user_id="newcomer", k=20))
    assert len(many.items) == 20 and all(i.source == COLD_START for i in many.items)
    explored = await stub.Recommend(inference_pb2.RecommendRequest(user_id="newcomer", k=4, exploration=0.5))
    assert [i.source for i in explored.items].count(EXPLORATION) == 2


async def test_without_a_model_popular_items_answer(start_inference, nats_client) -> None:
    await publish_events(
        nats_client,
        [event("a", "hit", event_id="1"), event("b", "hit", event_id="2"), event("c", "other", event_id="3")],
    )
    _app, stub = await start_inference()

    async def popular() -> Any:
        r = await stub.Recommend(inference_pb2.RecommendRequest(user_id="new", k=2))
        return r if len(r.items) == 2 else None

    response = await eventually(popular, what="popular items")
    assert [i.item_id for i in response.items] == ["hit", "other"]
    assert response.model_version == ""
    assert all(i.source == inference_pb2.RECOMMENDATION_SOURCE_POPULAR for i in response.items)


async def test_scores_and_neighbours_come_from_the_same_model(served) -> None:
    app, stub = served
    ranked = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=5))
    scored = await stub.ScoreItems(
        inference_pb2.ScoreItemsRequest(user_id="u1", item_ids=[*ids(ranked), "no-such-item"])
    )
    assert [s.item_id for s in scored.scores] == ids(ranked)
    assert np.allclose([s.score for s in scored.scores], [i.score for i in ranked.items], rtol=1e-5)
    assert list(scored.unknown_item_ids) == ["no-such-item"]
    assert scored.model_version == "v000001" and scored.trained_through.stream_sequence == 42
    similar = await stub.SimilarItems(inference_pb2.SimilarItemsRequest(item_id="gamma-3", k=5))
    assert len(similar.items) == 5 and "gamma-3" not in ids(similar)
    assert all(category_of(i) == "gamma" for i in ids(similar))
    assert similar.model_version == "v000001"


@pytest.mark.parametrize(
    "request_, words",
    [
        (inference_pb2.RecommendRequest(user_id="", k=5), "user_id is empty"),
        (inference_pb2.RecommendRequest(user_id="u1", k=1001), "at most 1000"),
        (inference_pb2.RecommendRequest(user_id="x" * 129), "longer than 128"),
        (inference_pb2.RecommendRequest(user_id="u1", diversity=1.5), "diversity"),
        (inference_pb2.RecommendRequest(user_id="u1", diversity=float("nan")), "diversity"),
        (inference_pb2.RecommendRequest(user_id="u1", exploration=-0.1), "exploration"),
        (inference_pb2.RecommendRequest(user_id="u1", exclude_item_ids=[""]), "exclude_item_ids"),
        (inference_pb2.RecommendRequest(user_id="u1", exclude_item_ids=["i"] * 1001), "at most 1000"),
        (inference_pb2.RecommendRequest(user_id="u1", categories=["c" * 200]), "category"),
        (inference_pb2.RecommendRequest(user_id="u1", context={"": "x"}), "context"),
    ],
)
async def test_invalid_recommend_requests(served, request_, words) -> None:
    _app, stub = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Recommend(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()


async def test_invalid_score_and_similar_requests(served) -> None:
    _app, stub = served
    cases = [
        (stub.ScoreItems(inference_pb2.ScoreItemsRequest(user_id="")), grpc.StatusCode.INVALID_ARGUMENT),
        (
            stub.ScoreItems(inference_pb2.ScoreItemsRequest(user_id="u1", item_ids=["a"] * 1001)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (stub.SimilarItems(inference_pb2.SimilarItemsRequest(item_id="")), grpc.StatusCode.INVALID_ARGUMENT),
        (
            stub.SimilarItems(inference_pb2.SimilarItemsRequest(item_id="alpha-1", k=5000)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (stub.SimilarItems(inference_pb2.SimilarItemsRequest(item_id="nope")), grpc.StatusCode.NOT_FOUND),
    ]
    for call, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == code and caught.value.details()
