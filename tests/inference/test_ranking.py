"""Retrieval and re-ranking pieces: the ANN index against exact ranking (recall, filters), MMR,
exploration slot placement; and the service answering through its ANN path."""

from __future__ import annotations

import numpy as np
import pytest

from freshrec.v1 import inference_pb2
from services.inference.ann import AnnIndex, AnnSettings
from services.inference.index import top_k
from services.inference.ranking import exploration_slots, interleave, mmr
from tests.conftest import eventually
from tests.factories import event
from tests.inference.artifacts import catalogue_items, category_of, write
from tests.inference.conftest import publish_events, publish_items, recent_items, wait_serving


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    rows = centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, dim))
    rows *= rng.uniform(0.5, 1.5, size=(n, 1))  # varied norms: inner product is not cosine
    return np.vstack([np.zeros((1, dim)), rows]).astype(np.float32)


def test_ann_recall_at_10_against_exact() -> None:
    matrix = clustered(5000, 32, 40)
    ann = AnnIndex.build(matrix, AnnSettings(exact_limit=0))
    rng = np.random.default_rng(1)
    recalls = []
    for query in rng.normal(size=(100, 32)).astype(np.float32):
        scores = matrix @ query
        scores[0] = -np.inf
        exact = set(top_k(scores, 10).tolist())
        rows, ann_scores = ann.search(query, 10)
        assert np.allclose(ann_scores, scores[rows], rtol=1e-4, atol=1e-4)
        recalls.append(len(exact & set(rows.tolist())) / 10)
    assert np.mean(recalls) >= 0.95


def test_ann_filters_apply_inside_the_search() -> None:
    matrix = clustered(3000, 16, 10)
    ann = AnnIndex.build(matrix, AnnSettings(exact_limit=0))
    allowed = np.arange(1, 3001, 7)  # one item in seven
    banned = allowed[:20]
    query = np.random.default_rng(2).normal(size=16).astype(np.float32)
    rows, _ = ann.search(query, 10, ann.bitmap(allowed), banned)
    assert len(rows) == 10
    assert set(rows.tolist()) <= set(allowed.tolist()) - set(banned.tolist())
    scores = matrix @ query
    exact = allowed[~np.isin(allowed, banned)]
    best = set(exact[top_k(scores[exact], 10)].tolist())
    assert len(best & set(rows.tolist())) >= 9


@pytest.mark.parametrize("seed", range(3))
def test_top_k_matches_a_full_sort(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(60):
        n, k = int(rng.integers(1, 20_000)), int(rng.integers(1, 1200))
        scores = np.round(rng.normal(size=n), 2).astype(np.float32)  # ties included
        scores[rng.integers(0, n, int(rng.integers(0, n + 1)))] = -np.inf
        got = top_k(scores, k)
        finite = np.flatnonzero(np.isfinite(scores))
        expected = finite[np.argsort(-scores[finite], kind="stable")][:k]
        assert len(got) == len(expected) and len(set(got.tolist())) == len(got)
        assert np.array_equal(scores[got], scores[expected])


def test_mmr_without_diversity_is_relevance_order_and_with_it_spreads_out() -> None:
    rng = np.random.default_rng(3)
    unit = rng.normal(size=(50, 8)).astype(np.float32)
    unit[:10] = unit[0] + 0.01 * rng.normal(size=(10, 8))  # ten near-duplicates of the best item
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    relevance = np.linspace(1.0, 0.0, 50).astype(np.float32)
    assert mmr(relevance, unit, 10, 0.0).tolist() == list(range(10))
    diverse = mmr(relevance, unit, 10, 0.7)
    assert diverse[0] == 0 and len(set(diverse.tolist())) == 10
    assert len(set(diverse.tolist()) & set(range(10))) <= 2


@pytest.mark.parametrize(
    "k, share, slots", [(10, 0.0, 0), (10, 0.1, 1), (10, 0.25, 3), (10, 1.0, 10), (1, 0.01, 1), (3, 0.34, 2)]
)
def test_exploration_slots(k: int, share: float, slots: int) -> None:
    assert exploration_slots(k, share) == slots


def test_interleave_spreads_exploration_and_fills_from_either_side() -> None:
    merged = interleave([0, 1, 2, 3, 4, 5, 6], [0, 1, 2], 10)
    assert [n for n, (_, explore) in enumerate(merged) if explore] == [2, 5, 7]
    assert [i for i, explore in merged if not explore] == [0, 1, 2, 3, 4, 5, 6]
    assert len(interleave([0, 1], [0, 1, 2, 3], 5)) == 5  # too few main items: exploration fills
    assert len(interleave([0, 1, 2, 3, 4], [], 5)) == 5


async def test_the_service_answers_through_its_ann_index(
    start_inference, store, nats_client, feature
) -> None:
    write(store, "v000001", item_tower=True)
    store.set_live("v000001")
    await publish_items(nats_client, catalogue_items())
    await publish_events(
        nats_client, [event("u3", "delta-1", event_id="d1"), event("u3", "delta-2", event_id="d2")]
    )

    async def applied() -> bool:
        return len(await recent_items(feature.port, "u3")) == 2

    await eventually(applied, what="u3's events")
    app, stub = await start_inference(ann={"exact_limit": 50})
    await wait_serving(stub, "v000001")
    assert app.holder.current is not None and app.holder.current.ann is not None

    async def catalogue_known() -> bool:
        return app.holder.state.catalogue_version >= 120

    await eventually(catalogue_known, what="the catalogue")
    exact = app.holder.state.all_scores(
        app.holder.current.user_vectors([[("delta-1", 2), ("delta-2", 2)]], ["u3"])[0]
    )
    response = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u3", k=10))
    got = [i.item_id for i in response.items]
    assert len(got) == 10 and not {"delta-1", "delta-2"} & set(got)
    state = app.holder.state
    exact[state.positions(["delta-1", "delta-2"])] = -np.inf
    expected = [state.item_id(int(p)) for p in top_k(exact, 10)]
    assert len(set(expected) & set(got)) >= 9
    # Filters go into the ANN search (60 allowed items > exact_limit, so the index answers).
    filtered = await stub.Recommend(
        inference_pb2.RecommendRequest(
            user_id="u3", k=40, categories=["gamma", "beta"], exclude_item_ids=["gamma-0"]
        )
    )
    assert len(filtered.items) == 40
    assert {category_of(i.item_id) for i in filtered.items} == {"gamma", "beta"}
    assert "gamma-0" not in {i.item_id for i in filtered.items}
    similar = await stub.SimilarItems(inference_pb2.SimilarItemsRequest(item_id="beta-3", k=5))
    assert len(similar.items) == 5 and {category_of(i.item_id) for i in similar.items} == {"beta"}
