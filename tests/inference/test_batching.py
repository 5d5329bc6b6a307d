"""Work shared between concurrent requests: user lookups (one BatchGetUserFeatures call for the
users asked together, against the real feature service) and user-tower calls with exact scoring
(one onnxruntime call and one matrix product for the requests that arrive together, through a
real exported model)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from freshrec.v1 import feature_pb2, feature_pb2_grpc
from services.feature.server import FeatureApp
from services.inference.batcher import BATCH_SIZE, UserTowerBatcher
from services.inference.catalogue import CatalogueEntry
from services.inference.features import LOOKUP_BATCH, FeatureClient
from services.inference.index import ExplorationSettings, ServingState, build_state
from services.inference.model import load_model
from shared.model_store import ModelStore
from tests.conftest import eventually
from tests.factories import event
from tests.inference.artifacts import Spec, catalogue_items, write
from tests.inference.conftest import publish_events, recent_items


def observed(histogram: Any) -> tuple[float, float]:
    """(number of observations, their sum) so far."""
    samples = {s.name: s.value for s in histogram.collect()[0].samples}
    return samples[f"{histogram._name}_count"], samples[f"{histogram._name}_sum"]


async def test_concurrent_lookups_share_batch_calls_and_each_gets_its_own_user(
    feature: FeatureApp, nats_client: Any
) -> None:
    users = [f"b{n}" for n in range(24)]
    await publish_events(nats_client, [event(u, f"item-{u}-{k}") for u in users for k in range(2)])
    await eventually(lambda: recent_items(feature.port, users[-1]), what="the events applied")

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{feature.port}")
    client = FeatureClient(channel, deadline_s=5.0, batch_size=8)
    try:
        before = observed(LOOKUP_BATCH)
        asked = users + ["nobody"] + users[:4]  # repeats and a stranger among them
        views = await asyncio.gather(*(client.user(u) for u in asked))
        calls, looked_up = (a - b for a, b in zip(observed(LOOKUP_BATCH), before, strict=True))
    finally:
        await channel.close()

    for user, view in zip(asked, views, strict=True):
        if user == "nobody":
            assert not view.known and view.recent == [] and view.fresh
        else:
            assert view.known and view.fresh
            assert view.recent_items == [f"item-{user}-0", f"item-{user}-1"]  # oldest first
    # 29 lookups: the first (b0) goes out alone; the other 28 wait and share calls of up to 8,
    # a repeated user once per call (b1-b3 join their waiting lookup; b0 waits for the next call).
    assert looked_up == 1 + 25
    assert calls == 1 + 4


class OlderFeatureService(feature_pb2_grpc.FeatureServiceServicer):
    """A feature service from before BatchGetUserFeatures: the base class answers UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def GetUserFeatures(self, request: Any, context: Any) -> Any:
        self.asked.append(request.user_id)
        features = feature_pb2.UserFeatures(user_id=request.user_id, known=True)
        features.recent.add(item_id=f"seen-by-{request.user_id}", weight=1.0)
        return feature_pb2.GetUserFeaturesResponse(features=features)


@pytest.fixture
async def older() -> AsyncIterator[tuple[OlderFeatureService, grpc.aio.Server, FeatureClient]]:
    """An older feature service on a real gRPC server, and a client of it."""
    service = OlderFeatureService()
    server = grpc.aio.server()
    feature_pb2_grpc.add_FeatureServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield service, server, FeatureClient(channel, deadline_s=5.0)
    await channel.close()
    await server.stop(None)


async def test_a_feature_service_without_the_batch_call_is_asked_one_user_at_a_time(
    older: tuple[OlderFeatureService, grpc.aio.Server, FeatureClient],
) -> None:
    service, _, client = older
    views = await asyncio.gather(*(client.user(f"u{n}") for n in range(5)))
    assert [v.recent_items for v in views] == [[f"seen-by-u{n}"] for n in range(5)]
    assert not client.batched and sorted(service.asked) == [f"u{n}" for n in range(5)]
    assert (await client.user("u9")).recent_items == ["seen-by-u9"]


async def test_a_failed_batch_call_answers_each_user_from_the_cache(
    older: tuple[OlderFeatureService, grpc.aio.Server, FeatureClient],
) -> None:
    _, server, client = older
    client.batched = False
    assert (await client.user("u1")).fresh  # cached now
    client.batched = True
    await server.stop(None)  # the batch call fails (UNAVAILABLE), not UNIMPLEMENTED
    cached, unknown = await asyncio.gather(client.user("u1"), client.user("u2"))
    assert not cached.fresh and cached.recent_items == ["seen-by-u1"]
    assert not unknown.fresh and not unknown.known
    assert client.batched


@pytest.fixture
def states(tmp_path: Path) -> tuple[ServingState, ServingState]:
    """Two serving states of two model versions, the second with catalogue items it never saw."""
    store = ModelStore(tmp_path / "models")
    write(store, "v000001", Spec(seed=1))
    write(store, "v000002", Spec(seed=2))
    exploration = ExplorationSettings(3600.0, 0.1)
    first = build_state(load_model(store, "v000001", None, 1), 0, {}, None, exploration)
    known = {item.item_id: CatalogueEntry.from_proto(item) for item in catalogue_items(Spec(seed=2))}
    fresh = {f"alpha-new{n}": CatalogueEntry(f"new {n}", ("alpha",), (), 0.0) for n in range(3)}
    second = build_state(load_model(store, "v000002", None, 1), 1, known | fresh, None, exploration)
    assert len(second.fresh_ids) == 3
    return first, second


async def test_user_tower_calls_of_concurrent_requests_are_batched_per_state(
    states: tuple[ServingState, ServingState],
) -> None:
    first, second = states
    histories = [[("alpha-1", 1), (f"beta-{n}", 1)] for n in range(10)] + [[]]
    asked = [(first if n % 3 else second, h, f"u{n}", n % 2 == 0) for n, h in enumerate(histories)]
    batcher = UserTowerBatcher(max_batch=4)
    try:
        before = observed(BATCH_SIZE)
        found = await asyncio.gather(*(batcher.vector(s, h, u, score_all=score) for s, h, u, score in asked))
        calls, requests = (a - b for a, b in zip(observed(BATCH_SIZE), before, strict=True))
    finally:
        await batcher.close()
    for (state, history, user, score), result in zip(asked, found, strict=True):
        alone = state.model.user_vectors([history], [user])[0]
        np.testing.assert_allclose(result.vector, alone, rtol=1e-5, atol=1e-6)
        if score:  # the batch's product equals scoring this user alone, fresh items included
            assert result.scores is not None and len(result.scores) == state.total
            np.testing.assert_allclose(result.scores, state.all_scores(alone), rtol=1e-4, atol=1e-5)
        else:
            assert result.scores is None
    assert requests == len(asked) and calls == 3  # 11 requests arriving together, 4 at a time


async def test_a_failing_user_tower_fails_only_its_own_requests(
    states: tuple[ServingState, ServingState],
) -> None:
    good, bad = states
    bad.model.session = None  # onnxruntime is gone: every call with this model raises
    batcher = UserTowerBatcher()
    try:
        results = await asyncio.gather(
            batcher.vector(good, [("alpha-1", 1)], "u1"),
            batcher.vector(bad, [("alpha-1", 1)], "u2"),
            return_exceptions=True,
        )
        assert not isinstance(results[0], BaseException) and isinstance(results[1], AttributeError)
        assert (await batcher.vector(good, [], "u3")).vector.shape == (good.model.dim,)  # still works
    finally:
        await batcher.close()
