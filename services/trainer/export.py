"""Exporting the learner as a model-store version: ONNX user tower, item matrix, id lists, manifest.

The export is checked with onnxruntime against torch before it is written, so a version that
reaches the store computes what the trainer learned.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from services.trainer.learner import OnlineLearner

USER_TOWER = "user_tower.onnx"
ITEM_EMBEDDINGS = "item_embeddings.npy"
ITEM_IDS = "item_ids.json"
USER_IDS = "user_ids.json"
FORMAT = "freshrec.two_tower.v1"


class ExportError(Exception):
    """The exported graph does not reproduce the torch model."""


@dataclass
class Export:
    files: dict[str, bytes]
    manifest: dict[str, Any]
    seconds: float


def export_learner(learner: OnlineLearner, parent_version: str | None, tolerance: float = 1e-4) -> Export:
    """Serialises the learner's current weights and checks the ONNX graph against torch."""
    start = time.perf_counter()
    s = learner.state
    model = learner.model.eval()
    item_rows = len(s.item_map)
    example_history = torch.zeros((2, learner.max_history), dtype=torch.long)
    example_user = torch.zeros((2,), dtype=torch.long)
    graph = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example_history, example_user),
            graph,  # type: ignore[arg-type]  # a file-like object is accepted at run time
            dynamo=False,
            input_names=["history", "user"],
            output_names=["user_embedding"],
            dynamic_axes={"history": {0: "batch"}, "user": {0: "batch"}, "user_embedding": {0: "batch"}},
            opset_version=17,
        )
    with torch.no_grad():
        matrix = model.item_matrix(item_rows).detach().numpy().astype(np.float32)
    npy = io.BytesIO()
    np.save(npy, matrix, allow_pickle=False)
    files = {
        USER_TOWER: graph.getvalue(),
        ITEM_EMBEDDINGS: npy.getvalue(),
        ITEM_IDS: json.dumps(s.item_map.ids).encode(),
        USER_IDS: json.dumps(s.user_map.ids).encode(),
    }
    _check_against_torch(learner, files[USER_TOWER], tolerance)
    manifest = {
        "format": FORMAT,
        "parent_version": parent_version or "",
        "created_at": datetime.now(UTC).isoformat(),
        "model": {
            "dim": learner.dim,
            "max_history": learner.max_history,
            "history_order": "oldest_first_left_padded",
            "inputs": {"history": ["batch", learner.max_history], "user": ["batch"]},
            "outputs": {"user_embedding": ["batch", learner.dim]},
            "item_rows": item_rows,
            "user_rows": len(s.user_map),
            "padding_row": 0,
        },
        "trained_through": {"stream_sequence": s.stream_sequence, "event_time": s.event_time},
        "events_learned": s.events_learned,
        "metrics": s.prequential.as_metrics(),
    }
    return Export(files=files, manifest=manifest, seconds=time.perf_counter() - start)


def _check_against_torch(learner: OnlineLearner, graph: bytes, tolerance: float) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    item_rows = max(len(learner.state.item_map), 2)
    user_rows = max(len(learner.state.user_map), 2)
    for batch in (1, 64):
        history = torch.randint(0, item_rows, (batch, learner.max_history), generator=generator)
        users = torch.randint(0, user_rows, (batch,), generator=generator)
        with torch.no_grad():
            expected = learner.model(history, users).numpy()
        (got,) = session.run(None, {"history": history.numpy(), "user": users.numpy()})
        if not np.all(np.isfinite(got)):
            raise ExportError("the exported user tower produces non-finite values")
        error = float(np.abs(got - expected).max())
        if error > tolerance:
            raise ExportError(f"ONNX differs from torch by {error:.2e} (> {tolerance:.0e}) at batch {batch}")
