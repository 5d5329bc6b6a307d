"""Every kind of bad artifact is refused before it can serve a request, with a reason; the old
model keeps serving and health stays SERVING. Good artifacts with every optional part load."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from freshrec.v1 import inference_pb2
from services.inference.model import RejectedArtifact, load_model
from shared.model_store import ModelStore
from tests.conftest import eventually
from tests.inference.artifacts import build, write
from tests.inference.conftest import SERVING, announce, health_status, wait_serving


def truncate(store: ModelStore, version: str) -> None:
    graph = store.versions_dir / version / "user_tower.onnx"
    graph.write_bytes(graph.read_bytes()[: len(graph.read_bytes()) // 2])


def flip_bit(store: ModelStore, version: str) -> None:
    matrix = store.versions_dir / version / "item_embeddings.npy"
    data = bytearray(matrix.read_bytes())
    data[len(data) // 2] ^= 0x10
    matrix.write_bytes(bytes(data))


def store_with_broken_graph(store: ModelStore, version: str) -> None:
    """A producer bug rather than corruption: the manifest hashes a graph that is not ONNX."""
    files, manifest = build()
    files["user_tower.onnx"] = files["user_tower.onnx"][:200]
    store.write_version(version, files, manifest)


# (name, how to make the bad version, expected reason kind, words in the reason)
BAD: list[tuple[str, Callable[[ModelStore, str], Any], str, str]] = [
    ("truncated", lambda s, v: (write(s, v), truncate(s, v)), "integrity", "bytes, manifest says"),
    ("bit-flipped", lambda s, v: (write(s, v), flip_bit(s, v)), "integrity", "does not match its sha256"),
    ("not-onnx", store_with_broken_graph, "graph", "onnxruntime cannot load"),
    (
        "input-renamed",
        lambda s, v: write(s, v, graph_input_names=("items", "user")),
        "interface",
        "inputs are",
    ),
    (
        "unknown-input",
        lambda s, v: write(s, v, extra_manifest_inputs={"weather": ["batch"]}),
        "interface",
        "cannot fill: ['weather']",
    ),
    ("wrong-length", lambda s, v: write(s, v, graph_history_length=5), "interface", "input history"),
    ("nan-user-tower", lambda s, v: write(s, v, nan_user_tower=True), "nonfinite", "NaN"),
    ("nan-item-matrix", lambda s, v: write(s, v, nan_in_matrix=True), "nonfinite", "NaN"),
    (
        "nan-item-tower",
        lambda s, v: write(s, v, item_tower=True, nan_item_tower=True),
        "nonfinite",
        "item tower",
    ),
]


@pytest.mark.parametrize("name, make, kind, words", BAD, ids=[b[0] for b in BAD])
def test_load_refuses_a_bad_artifact(tmp_path, name, make, kind, words) -> None:
    store = ModelStore(tmp_path / "models")
    make(store, "v000002")
    with pytest.raises(RejectedArtifact) as caught:
        load_model(store, "v000002", None, 1)
    assert caught.value.kind == kind and words in str(caught.value)


def test_load_refuses_a_digest_other_than_announced(tmp_path) -> None:
    store = ModelStore(tmp_path / "models")
    sha = write(store, "v000001")
    with pytest.raises(RejectedArtifact, match="differs from the announced"):
        load_model(store, "v000001", "0" * 64, 1)
    assert load_model(store, "v000001", sha, 1).version == "v000001"


def test_every_optional_part_of_the_contract_loads(tmp_path) -> None:
    store = ModelStore(tmp_path / "models")
    write(store, "v000001", history_types=True, context=True, item_tower=True)
    model = load_model(store, "v000001", None, 1)
    assert model.inputs == {"history", "user", "history_types", "context"}
    assert model.item_tower is not None
    history = [("alpha-1", 2), ("alpha-2", 4)]
    plain = model.user_vectors([history], ["u1"])
    with_context = model.user_vectors([history], ["u1"], [{"device": "mobile"}])
    assert plain.shape == (1, 16) and not np.allclose(plain, with_context)  # the context input is fed
    other_types = model.user_vectors([[("alpha-1", 1), ("alpha-2", 1)]], ["u1"])
    assert not np.allclose(plain, other_types)  # and so are the event types
    embedded = model.item_tower.embed([(("alpha",), ("red",)), (("beta",), ())])
    assert embedded.shape == (2, 16) and np.all(np.isfinite(embedded))


def rejections(kind: str) -> float:
    return REGISTRY.get_sample_value("freshrec_inference_model_rejections_total", {"reason": kind}) or 0.0


async def test_bad_versions_are_rejected_while_the_old_model_keeps_serving(
    start_inference, store, nats_client, caplog
) -> None:
    write(store, "v000001")
    store.set_live("v000001")
    app, stub = await start_inference()
    await wait_serving(stub, "v000001")
    caplog.set_level(logging.ERROR, logger="services.inference.reloader")

    before = {kind: rejections(kind) for _, _, kind, _ in BAD}
    expected_extra: dict[str, int] = {}
    for n, (_name, make, kind, _words) in enumerate(BAD, start=2):
        version = f"v{n:06d}"
        make(store, version)
        await announce(nats_client, store, version)
        expected_extra[kind] = expected_extra.get(kind, 0) + 1
    wrong_digest = f"v{len(BAD) + 2:06d}"
    write(store, wrong_digest)
    await announce(nats_client, store, wrong_digest, "f" * 64)
    expected_extra["integrity"] += 1
    bad_versions = {f"v{n:06d}" for n in range(2, len(BAD) + 3)}

    async def all_rejected() -> bool:
        return bad_versions <= set(app.holder.failed)

    await eventually(all_rejected, what="every bad version rejected")
    for kind, extra in expected_extra.items():
        assert rejections(kind) - before.get(kind, 0.0) == extra, kind
    logged = [r.getMessage() for r in caplog.records if "rejected model" in r.getMessage()]
    assert {v for v in bad_versions if any(v in line for line in logged)} == bad_versions

    # Through all of it: the old model answers every request and health stays SERVING.
    assert await health_status(app.port) == SERVING
    response = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=5))
    assert response.model_version == "v000001" and len(response.items) == 5
    info = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
    assert info.model_version == "v000001" and json.loads(info.manifest_json)["version"] == "v000001"
    assert list(info.loaded_versions) == ["v000001"]

    # The poll does not retry a version already rejected; a good one still swaps in.
    good = write(store, "v000100")
    await announce(nats_client, store, "v000100", good)
    await wait_serving(stub, "v000100")


async def test_a_rejected_live_pointer_is_not_retried_by_the_poll(start_inference, store) -> None:
    write(store, "v000001")
    store.set_live("v000001")
    app, stub = await start_inference(poll_interval_s=0.05)
    await wait_serving(stub, "v000001")
    write(store, "v000002", nan_user_tower=True)
    store.set_live("v000002")  # e.g. a trainer that skipped its own checks

    async def rejected() -> bool:
        return "v000002" in app.holder.failed

    await eventually(rejected, what="the poll to find and reject v000002")
    assert app.holder.served_version == "v000001"
    assert await health_status(app.port) == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SimilarItems(inference_pb2.SimilarItemsRequest(item_id="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
