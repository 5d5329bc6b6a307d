"""ONNX export: the graphs reproduce torch (batch 1 and 64), rows are compacted, content-only items
are included, optional inputs are declared, and export with validation stays within 3 s."""

from __future__ import annotations

import io
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from services.trainer.export import (
    CONTENT_VOCAB,
    ITEM_EMBEDDINGS,
    ITEM_IDS,
    ITEM_TOWER,
    USER_IDS,
    USER_TOWER,
    ExportError,
    _check,
    export_learner,
)
from services.trainer.learner import Learner, LearnerConfig
from services.trainer.model import ModelConfig
from tests.factories import event
from tests.trainer.streams import T0, catalogue_item, small_learner, taste_stream


def trained(**overrides: object) -> Learner:
    learner = small_learner(**overrides)
    learner.add_items(
        [(1, catalogue_item("cold", ["a-genre"], ["t1", "t2"])), (2, catalogue_item("a3", ["a-genre"]))]
    )
    stream = taste_stream(rounds=8)
    for start in range(0, len(stream), 64):
        learner.learn(stream[start : start + 64])
    return learner


def session(data: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 64])
def test_the_user_tower_reproduces_torch_for_real_users(batch: int) -> None:
    learner = trained(row_ttl_s=1e9)
    exported = export_learner(learner, parent_version=None)
    item_ids = json.loads(exported.files[ITEM_IDS])
    user_ids = json.loads(exported.files[USER_IDS])
    assert item_ids[0] == "" and user_ids[0] == ""
    export_row = {item: row for row, item in enumerate(item_ids) if row}
    users = [f"u{n % 40}" for n in range(batch)]
    length = learner.max_history
    history = np.zeros((batch, length), dtype=np.int64)
    for i, u in enumerate(users):
        rows = [export_row[learner.items.ids[e[0]]] for e in learner.histories[u]]
        history[i, length - len(rows) :] = rows
    user_rows = np.array([user_ids.index(u) for u in users], dtype=np.int64)
    inputs = {"history": history, "user": user_rows}
    (got,) = session(exported.files[USER_TOWER]).run(None, inputs)
    expected = learner.user_vectors(users).numpy()
    assert got.shape == (batch, 16) and np.abs(got - expected).max() < 1e-4
    matrix = np.load(io.BytesIO(exported.files[ITEM_EMBEDDINGS]), allow_pickle=False)
    assert matrix.dtype == np.float32 and matrix.shape == (len(item_ids), 16)
    assert not matrix[0].any() and np.isfinite(matrix).all()
    table = learner.item_table().numpy()
    rows = [learner.items.get(i) for i in item_ids[1:]]
    assert np.abs(matrix[1:] - table[rows]).max() < 1e-6
    # Scores are dot products with these rows, and every one is finite.
    assert np.isfinite(got @ matrix.T).all()


def test_untouched_catalogue_items_are_exported_by_content_and_the_item_tower_matches() -> None:
    learner = trained()
    exported = export_learner(learner, parent_version="v000001")
    assert exported.manifest["parent_version"] == "v000001"
    item_ids = json.loads(exported.files[ITEM_IDS])
    assert "cold" in item_ids
    matrix = np.load(io.BytesIO(exported.files[ITEM_EMBEDDINGS]))
    vocab = json.loads(exported.files[CONTENT_VOCAB])
    tower = exported.manifest["model"]["item_tower"]
    c, t = tower["max_categories"], tower["max_tags"]
    categories = np.zeros((1, c), dtype=np.int64)
    tags = np.zeros((1, t), dtype=np.int64)
    categories[0, 0] = vocab["categories"].index("a-genre")
    tags[0, :2] = [vocab["tags"].index("t1"), vocab["tags"].index("t2")]
    (vector,) = session(exported.files[ITEM_TOWER]).run(None, {"categories": categories, "tags": tags})
    assert np.abs(vector[0] - matrix[item_ids.index("cold")]).max() < 1e-5


def test_expired_rows_never_reach_an_export() -> None:
    learner = trained(row_ttl_s=50.0)
    learner.learn([(10_000, event("late-user", "late-item", at=T0 + 10_000))])
    learner.expire()
    exported = export_learner(learner, parent_version=None)
    item_ids = json.loads(exported.files[ITEM_IDS])
    assert item_ids == ["", "late-item"] and json.loads(exported.files[USER_IDS]) == ["", "late-user"]
    assert exported.manifest["model"]["item_rows"] == 2


def test_optional_inputs_are_declared_and_reproduce_torch() -> None:
    learner = small_learner(model_event_types=True, model_max_context=2)
    stream = taste_stream(rounds=4)
    for _, e in stream:
        e.context["device"] = "phone" if int(e.user_id[1:]) % 2 else "tv"
    learner.learn(stream)
    exported = export_learner(learner, parent_version=None)
    model = exported.manifest["model"]
    assert set(model["inputs"]) == {"history", "user", "history_types", "context"}
    assert model["max_context"] == 2
    vocab = json.loads(exported.files["context_vocab.json"])
    assert vocab[0] == "" and "device=tv" in vocab
    graph = session(exported.files[USER_TOWER])
    assert {i.name for i in graph.get_inputs()} == set(model["inputs"])
    rng = np.random.default_rng(3)
    for batch in (1, 64):
        feed = {
            "history": rng.integers(0, model["item_rows"], (batch, 10)),
            "user": rng.integers(0, model["user_rows"], (batch,)),
            "history_types": rng.integers(0, 8, (batch, 10)),
            "context": rng.integers(0, len(vocab), (batch, 2)),
        }
        (got,) = graph.run(None, feed)
        assert got.shape == (batch, 16) and np.isfinite(got).all()


@pytest.mark.slow
def test_the_default_model_exports_and_validates_at_movielens_size() -> None:
    # Its time is a benchmark figure (bench/stream.py: export_seconds_median), not asserted here.
    learner = Learner(LearnerConfig(model=ModelConfig()))  # dim 64, 50 items of history, 2 blocks
    learner.add_items([(n, catalogue_item(f"i{n}", [f"g{n % 19}"], [f"y{n % 70}"])) for n in range(1, 1683)])
    rng = np.random.default_rng(0)
    events = [
        (n, event(f"u{rng.integers(943)}", f"i{rng.integers(1, 1683)}", at=T0 + n)) for n in range(1, 5001)
    ]
    learner.observe(events)
    torch.set_num_threads(1)
    exported = export_learner(learner, parent_version=None)
    assert exported.seconds > 0 and exported.manifest["model"]["item_rows"] == 1683


def test_the_export_gate_measures_errors_against_the_outputs_scale() -> None:
    from onnx import TensorProto, helper

    doubled = helper.make_model(
        helper.make_graph(
            [helper.make_node("Add", ["x", "x"], ["y"])],
            "double",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    ).SerializeToString()

    class Shifted(torch.nn.Module):
        def __init__(self, shift: float) -> None:
            super().__init__()
            self.shift = shift

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x + self.shift

    small, large = (torch.full((2, 4), 0.5),), (torch.full((2, 4), 5000.0),)
    with pytest.raises(ExportError, match="differs from torch"):
        _check(doubled, Shifted(1e-3), ["x"], [small], 1e-4)  # 1e-3 on outputs of 1
    _check(doubled, Shifted(1e-3), ["x"], [large], 1e-4)  # 1e-3 on outputs of 10,000: rounding
    with pytest.raises(ExportError):
        _check(doubled, Shifted(5.0), ["x"], [large], 1e-4)
