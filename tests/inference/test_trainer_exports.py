"""Inference serving versions that the trainer's own exporter made (the other inference tests
build theirs with tests.inference.artifacts): every RPC, the hot swap on an announcement, bad
artifacts and digests refused while the old version serves, and invalid requests."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from freshrec.v1 import inference_pb2, trainer_pb2
from services.trainer.export import export_learner
from services.trainer.learner import OnlineLearner
from shared.model_store import ModelStore
from shared.nats import MODELS_PUBLISHED_SUBJECT
from tests.conftest import eventually
from tests.inference.conftest import Starter, publish_events, recent_items
from tests.trainer.streams import taste_stream


def write_model(store: ModelStore, version: str, rounds: int = 4) -> str:
    learner = OnlineLearner(dim=8, max_history=10, learning_rate=0.05)
    learner.learn(taste_stream(n_users=10, rounds=rounds))
    exported = export_learner(learner, parent_version=None)
    stored = store.write_version(version, exported.files, exported.manifest)
    return str(stored.manifest["sha256"])


async def announce_only(nats_client: Any, version: str, sha256: str = "") -> None:
    """Announces a version without moving LIVE, so only the announcement (with its digest), never
    the store poll, can bring it in."""
    msg = trainer_pb2.ModelAnnouncement(version=version, sha256=sha256, reason="published")
    await nats_client.publish(MODELS_PUBLISHED_SUBJECT, msg.SerializeToString())
    await nats_client.flush()


async def has_recent(feature_port: int, user: str, n: int) -> bool:
    return len(await recent_items(feature_port, user)) == n


@pytest.fixture
async def inference(start_inference: Starter, store: ModelStore) -> Any:
    """Inference on v000001, written by the exporter and live from the start: (app, stub, digest)."""
    sha = write_model(store, "v000001")
    store.set_live("v000001")
    app, stub = await start_inference(feature_deadline_s=1.0)
    return app, stub, sha


async def test_serves_the_live_model_from_start_and_excludes_seen_items(
    inference, feature, nats_client
) -> None:
    _app, stub, _ = inference
    info = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
    manifest = json.loads(info.manifest_json)
    assert info.model_version == "v000001" and manifest["format"] == "freshrec.two_tower.v1"
    assert info.catalogue_size == manifest["model"]["item_rows"] - 1 > 20

    history = [e for _, e in taste_stream(n_users=1, rounds=3)]
    for n, e in enumerate(history):
        e.event_id = f"h{n}"
    await publish_events(nats_client, history)
    seen = {e.item_id for e in history}
    await eventually(lambda: has_recent(feature.port, "u0", 3), what="u0's history in the feature service")

    response = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u0", k=10))
    assert response.items[0].source == inference_pb2.RECOMMENDATION_SOURCE_MODEL
    assert len(response.items) == 10 and response.model_version == "v000001"
    assert not seen & {i.item_id for i in response.items}
    assert [i.score for i in response.items] == sorted((i.score for i in response.items), reverse=True)
    with_seen = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u0", k=40, include_seen=True))
    assert seen <= {i.item_id for i in with_seen.items}
    excluded = await stub.Recommend(
        inference_pb2.RecommendRequest(user_id="u0", k=10, exclude_item_ids=[response.items[0].item_id])
    )
    assert response.items[0].item_id not in {i.item_id for i in excluded.items}

    similar = await stub.SimilarItems(inference_pb2.SimilarItemsRequest(item_id="a0", k=5))
    assert len(similar.items) == 5 and "a0" not in {i.item_id for i in similar.items}
    scored = await stub.ScoreItems(inference_pb2.ScoreItemsRequest(user_id="u0", item_ids=["a0", "nope"]))
    assert [s.item_id for s in scored.scores] == ["a0"] and list(scored.unknown_item_ids) == ["nope"]


async def test_hot_swap_on_announcement_and_bad_artifacts_keep_the_old_model(
    inference, store, nats_client
) -> None:
    app, stub, _ = inference
    sha2 = write_model(store, "v000002", rounds=5)
    await announce_only(nats_client, "v000002", sha2)

    async def serving(version: str):  # type: ignore[no-untyped-def]
        info = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
        return info.model_version == version

    await eventually(lambda: serving("v000002"), what="v000002 served")

    # A truncated graph: rejected, v000002 keeps serving, health stays SERVING.
    write_model(store, "v000003")
    graph = store.versions_dir / "v000003" / "user_tower.onnx"
    graph.write_bytes(graph.read_bytes()[:100])
    # The wrong digest announced for an intact version: rejected too.
    sha4 = write_model(store, "v000004")
    await announce_only(nats_client, "v000003")
    await announce_only(nats_client, "v000004", "f" * 64)

    async def both_rejected() -> bool:
        return {"v000003", "v000004"} <= set(app.holder.failed)

    await eventually(both_rejected, what="both bad versions rejected")
    assert "bytes, manifest says" in app.holder.failed["v000003"]
    assert "differs from the announced" in app.holder.failed["v000004"]
    assert await serving("v000002")
    response = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u0", k=5))
    assert response.model_version == "v000002"

    # The right digest for v000004 swaps it in.
    await announce_only(nats_client, "v000004", sha4)
    await eventually(lambda: serving("v000004"), what="v000004 served")


@pytest.mark.parametrize(
    "request_, code",
    [
        (inference_pb2.RecommendRequest(user_id="", k=5), grpc.StatusCode.INVALID_ARGUMENT),
        (inference_pb2.RecommendRequest(user_id="u", k=1001), grpc.StatusCode.INVALID_ARGUMENT),
        (inference_pb2.RecommendRequest(user_id="x" * 129), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_invalid_requests_get_invalid_argument(inference, request_, code) -> None:
    _app, stub, _ = inference
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Recommend(request_)
    assert caught.value.code() == code and caught.value.details()
