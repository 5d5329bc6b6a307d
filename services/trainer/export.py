"""Exporting the learner as a model-store version (format ``freshrec.two_tower.v1``).

Files: ``user_tower.onnx`` (the user tower with the item vectors folded in as a constant),
``item_embeddings.npy`` (float32 [N, D]; row i is ``item_ids.json[i]``, row 0 padding; every
item known at export, content-only for items nobody touched yet), ``item_ids.json``,
``user_ids.json`` (row 0 = ""), and when the model has them ``context_vocab.json`` and the
content-only ``item_tower.onnx`` with ``content_vocab.json``. Rows are compacted: expired rows
never reach an export.

The graphs are checked with onnxruntime against torch (batch sizes 1 and 64) before anything
is written, so a version that reaches the store computes what the trainer learned.
"""

from __future__ import annotations

import copy
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
from torch import nn

from services.trainer.learner import Learner
from services.trainer.model import PAD, TwoTower
from services.trainer.policy import FOLLOW_UP_BACKOFF, HALF_LIVES, POPULAR, SEGMENT_NAMES, SEGMENTS

USER_TOWER = "user_tower.onnx"
ITEM_TOWER = "item_tower.onnx"
ITEM_EMBEDDINGS = "item_embeddings.npy"
ITEM_IDS = "item_ids.json"
USER_IDS = "user_ids.json"
CONTEXT_VOCAB = "context_vocab.json"
CONTENT_VOCAB = "content_vocab.json"
POPULARITY = "popularity.npy"
FOLLOW_UP_ITEMS = "follow_up_items.npy"
FOLLOW_UP_COUNTS = "follow_up_counts.npy"
FORMAT = "freshrec.two_tower.v1"
OPSET = 17


class ExportError(Exception):
    """The exported graph does not reproduce the torch model."""


@dataclass
class Export:
    files: dict[str, bytes]
    manifest: dict[str, Any]
    seconds: float


class _UserTower(nn.Module):
    def __init__(self, model: TwoTower, table: torch.Tensor, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("table", table)
        self.names = names

    table: torch.Tensor

    def forward(self, history: torch.Tensor, user: torch.Tensor, *optional: torch.Tensor) -> torch.Tensor:
        given = dict(zip(self.names[2:], optional, strict=True))
        vectors = self.model.encode(
            self.table, history, user, given.get("history_types"), given.get("context")
        )
        return vectors[:, -1]


class _ItemTower(nn.Module):
    def __init__(self, model: TwoTower) -> None:
        super().__init__()
        self.model = model

    def forward(self, categories: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        return self.model.content_vectors(categories, tags, None, exportable=True)


@dataclass
class Compacted:
    """The learner's tables with live rows only, in export order."""

    tower: _UserTower
    item_tower: _ItemTower | None
    item_rows: list[int]  # learner row of each export row
    user_rows: list[int]
    matrix: np.ndarray
    input_names: list[str]


def compact(learner: Learner, item_tower: bool = True) -> Compacted:
    """A frozen copy of the model whose tables hold only live rows (row 0 padding)."""
    config = learner.config.model
    model = copy.deepcopy(learner.model).eval()
    item_rows = [PAD, *learner.items.live_rows()]
    user_rows = [PAD, *learner.users.live_rows()]
    with torch.no_grad():
        table = model.item_vectors(learner.items.capacity_needed)[torch.tensor(item_rows)].contiguous()
        table[PAD] = 0.0
        users = model.user_ids.weight[torch.tensor(user_rows)].clone()
        users[PAD] = 0.0
        model.user_ids = nn.Embedding.from_pretrained(users, freeze=True)
        contexts = model.contexts.weight[: max(learner.contexts.capacity_needed, 1)].clone()
        contexts[PAD] = 0.0
        model.contexts = nn.Embedding.from_pretrained(contexts, freeze=True)
    names = ["history", "user"]
    if config.event_types:
        names.append("history_types")
    if config.max_context:
        names.append("context")
    has_content = learner.categories.capacity_needed > 1 or learner.tags.capacity_needed > 1
    return Compacted(
        tower=_UserTower(model, table, names).eval(),
        item_tower=_ItemTower(model).eval() if item_tower and has_content else None,
        item_rows=item_rows,
        user_rows=user_rows,
        matrix=table.numpy().astype(np.float32),
        input_names=names,
    )


def _onnx(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], output: str) -> bytes:
    graph = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            graph,  # type: ignore[arg-type]  # a file-like object is accepted at run time
            dynamo=False,
            input_names=names,
            output_names=[output],
            dynamic_axes={**{n: {0: "batch"} for n in names}, output: {0: "batch"}},
            opset_version=OPSET,
        )
    return graph.getvalue()


def export_learner(
    learner: Learner, parent_version: str | None, tolerance: float = 1e-4, item_tower: bool = True
) -> Export:
    """Serialises the learner's current weights and checks every graph against torch."""
    start = time.perf_counter()
    config = learner.config.model
    c = compact(learner, item_tower)
    length, k = config.max_history, config.max_context
    n_items, n_users = len(c.item_rows), len(c.user_rows)
    n_contexts = max(learner.contexts.capacity_needed, 1)

    def examples(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        history = torch.randint(0, max(n_items, 2), (batch, length), generator=generator)
        history[:, : length // 3] = PAD  # padded on the left, as served
        out = [history, torch.randint(0, max(n_users, 2), (batch,), generator=generator)]
        if "history_types" in c.input_names:
            out.append(torch.randint(0, 8, (batch, length), generator=generator) * (history != PAD))
        if "context" in c.input_names:
            out.append(torch.randint(0, n_contexts, (batch, k), generator=generator))
        return tuple(out)

    generator = torch.Generator().manual_seed(0)
    files: dict[str, bytes] = {}
    with torch.no_grad():
        files[USER_TOWER] = _onnx(c.tower, examples(2, generator), c.input_names, "user_embedding")
        _check(
            files[USER_TOWER], c.tower, c.input_names, [examples(b, generator) for b in (1, 64)], tolerance
        )
    npy = io.BytesIO()
    np.save(npy, c.matrix, allow_pickle=False)
    files[ITEM_EMBEDDINGS] = npy.getvalue()
    files[ITEM_IDS] = json.dumps([learner.items.ids[r] for r in c.item_rows]).encode()
    files[USER_IDS] = json.dumps([learner.users.ids[r] for r in c.user_rows]).encode()
    if not np.all(np.isfinite(c.matrix)):
        raise ExportError("the item matrix holds non-finite values")

    inputs: dict[str, list[Any]] = {"history": ["batch", length], "user": ["batch"]}
    if "history_types" in c.input_names:
        inputs["history_types"] = ["batch", length]
    if "context" in c.input_names:
        inputs["context"] = ["batch", k]
        files[CONTEXT_VOCAB] = json.dumps(learner.contexts.ids).encode()
    model_info: dict[str, Any] = {
        "dim": config.dim,
        "max_history": length,
        "history_order": "oldest_first_left_padded",
        "inputs": inputs,
        "outputs": {"user_embedding": ["batch", config.dim]},
        "item_rows": n_items,
        "user_rows": n_users,
        "padding_row": PAD,
        "score": "dot",
        "architecture": config.to_dict(),
    }
    if k:
        model_info["max_context"] = k
    if c.item_tower is not None:
        cmax, tmax = config.max_categories, config.max_tags
        n_cat, n_tag = learner.categories.capacity_needed, learner.tags.capacity_needed
        with torch.no_grad():
            example = (torch.zeros((2, cmax), dtype=torch.long), torch.zeros((2, tmax), dtype=torch.long))
            files[ITEM_TOWER] = _onnx(c.item_tower, example, ["categories", "tags"], "item_embedding")
            probes: list[tuple[torch.Tensor, ...]] = [
                (
                    torch.randint(0, max(n_cat, 2), (b, cmax), generator=generator),
                    torch.randint(0, max(n_tag, 2), (b, tmax), generator=generator),
                )
                for b in (1, 64)
            ]
            _check(files[ITEM_TOWER], c.item_tower, ["categories", "tags"], probes, tolerance)
        files[CONTENT_VOCAB] = json.dumps(
            {"categories": learner.categories.ids, "tags": learner.tags.ids}
        ).encode()
        model_info["item_tower"] = {
            "file": ITEM_TOWER,
            "max_categories": cmax,
            "max_tags": tmax,
            "inputs": {"categories": ["batch", cmax], "tags": ["batch", tmax]},
            "outputs": {"item_embedding": ["batch", config.dim]},
            "vocab": CONTENT_VOCAB,
            "note": "content-only vectors; text-derived parts arrive with the next export",
        }
    # Which ranker answers which requests (``policy.py``), and the popularity columns it may pick.
    columns = learner.popularity.columns(learner.items.capacity_needed)[c.item_rows].astype(np.float32)
    columns[0] = 0.0
    npy = io.BytesIO()
    np.save(npy, columns, allow_pickle=False)
    files[POPULARITY] = npy.getvalue()
    # Follow-ups in export rows: row i lists what most often came right after item i.
    items, counts = learner.follow_ups.table(learner.items.capacity_needed)
    to_export = np.zeros(max(learner.items.capacity_needed, 1), dtype=np.int64)
    to_export[np.asarray(c.item_rows)] = np.arange(len(c.item_rows))
    follow_items = to_export[items[c.item_rows]]
    follow_items[0] = 0
    follow_counts = np.where(follow_items > 0, counts[c.item_rows], 0.0).astype(np.float32)
    for name, array in ((FOLLOW_UP_ITEMS, follow_items), (FOLLOW_UP_COUNTS, follow_counts)):
        npy = io.BytesIO()
        np.save(npy, array, allow_pickle=False)
        files[name] = npy.getvalue()
    serving = {
        "segments": {name: bound for name, bound in zip(SEGMENT_NAMES, SEGMENTS, strict=True)},
        "segment_by": "items the user touched before the request",
        "policy": learner.policy.choice(),
        "popularity": {"file": POPULARITY, "columns": list(POPULAR), "half_lives_events": list(HALF_LIVES)},
        "follow_ups": {
            "items": FOLLOW_UP_ITEMS,
            "counts": FOLLOW_UP_COUNTS,
            "backoff": POPULAR[FOLLOW_UP_BACKOFF],
            "score": "count after the user's last item + 0.5 x the back-off popularity column",
        },
    }
    p = learner.position
    manifest = {
        "format": FORMAT,
        "parent_version": parent_version or "",
        "created_at": datetime.now(UTC).isoformat(),
        "model": model_info,
        "trained_through": {"stream_sequence": p.stream_sequence, "event_time": p.event_time},
        "events_learned": p.events_learned,
        "metrics": {**learner.prequential.as_metrics(), **learner.policy.figures()},
        "serving": serving,
    }
    return Export(files=files, manifest=manifest, seconds=time.perf_counter() - start)


def _check(
    graph: bytes,
    module: nn.Module,
    names: list[str],
    probes: list[tuple[torch.Tensor, ...]],
    tolerance: float,
) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    for probe in probes:
        expected = module(*probe).numpy()
        (got,) = session.run(None, {n: t.numpy() for n, t in zip(names, probe, strict=True)})
        if not np.all(np.isfinite(got)):
            raise ExportError("the exported graph produces non-finite values")
        # Measured against the outputs' scale (at least 1): float32 sums in another order differ
        # by a few units in the last place of the largest values, not by a fixed amount.
        scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
        error = float(np.abs(got - expected).max(initial=0.0)) / scale
        if error > tolerance:
            raise ExportError(
                f"ONNX differs from torch by {error:.2e} of the outputs' scale {scale:.3g} "
                f"(> {tolerance:.0e}) at batch {probe[0].shape[0]}"
            )
