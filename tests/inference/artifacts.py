"""Model versions for inference tests, built with a small torch model and the real ONNX exporter.

The trainer exports only the required parts today; these builders also make the optional ones
of the artifact contract (``history_types`` and ``context`` inputs, an item tower) and every
kind of broken artifact inference must refuse.

The model is deliberately legible: item embeddings sit around one centre per category, and the
user vector is the mean of the user's recent item embeddings (plus a small id embedding), so a
user who clicks "alpha" items is recommended other "alpha" items.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from freshrec.v1 import item_pb2
from shared.model_store import ModelStore

CATEGORIES = ("alpha", "beta", "gamma", "delta")
TAGS = ("red", "green", "blue")
CONTEXT_VOCAB = ["", "device=mobile", "device=desktop", "page=home"]


@dataclass(frozen=True)
class Spec:
    """What to build; the defaults make a valid version with only the required inputs."""

    items_per_category: int = 30
    dim: int = 16
    max_history: int = 10
    users: int = 20
    seed: int = 0
    history_types: bool = False
    context: bool = False
    item_tower: bool = False
    nan_user_tower: bool = False
    nan_item_tower: bool = False
    graph_history_length: int | None = None  # a graph built for another L than the manifest says
    graph_input_names: tuple[str, ...] | None = None  # renamed graph inputs
    extra_manifest_inputs: dict[str, Any] = field(default_factory=dict)
    nan_in_matrix: bool = False


def item_ids(spec: Spec = Spec()) -> list[str]:
    return [f"{c}-{i}" for c in CATEGORIES for i in range(spec.items_per_category)]


def category_of(item_id: str) -> str:
    return item_id.split("-")[0]


def catalogue_items(spec: Spec = Spec(), created_at: float = 1_600_000_000.0) -> list[item_pb2.Item]:
    out = []
    for n, item_id in enumerate(item_ids(spec)):
        item = item_pb2.Item(
            item_id=item_id, title=f"Item {item_id}", categories=[category_of(item_id)], tags=[TAGS[n % 3]]
        )
        item.created_at.FromSeconds(int(created_at))
        out.append(item)
    return out


class UserTower(nn.Module):
    def __init__(self, items: torch.Tensor, spec: Spec) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(spec.seed + 1)
        self.items = nn.Embedding.from_pretrained(items, freeze=True, padding_idx=0)
        self.users = nn.Embedding.from_pretrained(
            torch.randn(spec.users + 1, spec.dim, generator=generator) * 0.05, freeze=True
        )
        self.types = nn.Embedding.from_pretrained(torch.randn(8, spec.dim, generator=generator) * 0.01)
        self.context = nn.Embedding.from_pretrained(
            torch.randn(len(CONTEXT_VOCAB), spec.dim, generator=generator) * 0.01
        )
        self.spec = spec

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        history, user = inputs[0], inputs[1]
        mask = (history != 0).unsqueeze(-1).float()
        out = (self.items(history) * mask).sum(1) / mask.sum(1).clamp(min=1.0) + self.users(user)
        extra = list(inputs[2:])
        if self.spec.history_types:
            out = out + (self.types(extra.pop(0)) * mask).sum(1)
        if self.spec.context:
            out = out + self.context(extra.pop(0)).sum(1)
        if self.spec.nan_user_tower:
            out = out * torch.sqrt(out.abs().sum() * -1.0 - 1.0)  # sqrt of a negative: NaN
        return out


class ItemTower(nn.Module):
    def __init__(self, centres: torch.Tensor, spec: Spec) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(spec.seed + 2)
        padded = torch.cat([torch.zeros(1, spec.dim), centres])
        self.categories = nn.Embedding.from_pretrained(padded, freeze=True, padding_idx=0)
        self.tags = nn.Embedding.from_pretrained(
            torch.randn(len(TAGS) + 1, spec.dim, generator=generator) * 0.05
        )
        self.spec = spec

    def forward(self, categories: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        mask = (categories != 0).unsqueeze(-1).float()
        out = (self.categories(categories) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out = out + self.tags(tags).sum(1)
        if self.spec.nan_item_tower:
            out = out * torch.sqrt(out.abs().sum() * -1.0 - 1.0)
        return out


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], output: str) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            input_names=names,
            output_names=[output],
            dynamic_axes={**{n: {0: "batch"} for n in names}, output: {0: "batch"}},
            opset_version=17,
        )
    return buffer.getvalue()


def build(spec: Spec = Spec()) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files and the manifest (without ``files``/``sha256``, which the store adds) of a version."""
    generator = torch.Generator().manual_seed(spec.seed)
    centres = torch.randn(len(CATEGORIES), spec.dim, generator=generator)
    centres = centres / centres.norm(dim=1, keepdim=True)
    ids = item_ids(spec)
    rows = [
        centres[CATEGORIES.index(category_of(i))] + 0.25 * torch.randn(spec.dim, generator=generator)
        for i in ids
    ]
    matrix = torch.cat([torch.zeros(1, spec.dim), torch.stack(rows)])
    tower = UserTower(matrix, spec).eval()

    length = spec.graph_history_length or spec.max_history
    names = ["history", "user"]
    args: list[torch.Tensor] = [
        torch.zeros((2, length), dtype=torch.long),
        torch.zeros((2,), dtype=torch.long),
    ]
    inputs: dict[str, Any] = {"history": ["batch", spec.max_history], "user": ["batch"]}
    if spec.history_types:
        names.append("history_types")
        args.append(torch.zeros((2, length), dtype=torch.long))
        inputs["history_types"] = ["batch", spec.max_history]
    if spec.context:
        names.append("context")
        args.append(torch.zeros((2, 2), dtype=torch.long))
        inputs["context"] = ["batch", 2]
    inputs.update(spec.extra_manifest_inputs)
    graph_names = list(spec.graph_input_names or names)
    numpy_matrix = matrix.numpy().astype(np.float32)
    if spec.nan_in_matrix:
        numpy_matrix[3, 2] = np.nan
    npy = io.BytesIO()
    np.save(npy, numpy_matrix, allow_pickle=False)
    files = {
        "user_tower.onnx": _export(tower, tuple(args), graph_names, "user_embedding"),
        "item_embeddings.npy": npy.getvalue(),
        "item_ids.json": json.dumps(["", *ids]).encode(),
        "user_ids.json": json.dumps(["", *[f"u{n}" for n in range(spec.users)]]).encode(),
    }
    model: dict[str, Any] = {
        "dim": spec.dim,
        "max_history": spec.max_history,
        "inputs": inputs,
        "outputs": {"user_embedding": ["batch", spec.dim]},
        "item_rows": len(ids) + 1,
    }
    if spec.context:
        files["context_vocab.json"] = json.dumps(CONTEXT_VOCAB).encode()
        model["max_context"] = 2
    if spec.item_tower:
        item_tower = ItemTower(centres, spec).eval()
        example = (torch.zeros((2, 2), dtype=torch.long), torch.zeros((2, 3), dtype=torch.long))
        files["item_tower.onnx"] = _export(item_tower, example, ["categories", "tags"], "item_embedding")
        files["content_vocab.json"] = json.dumps(
            {"categories": ["", *CATEGORIES], "tags": ["", *TAGS]}
        ).encode()
        model["item_tower"] = {"max_categories": 2, "max_tags": 3}
    manifest = {
        "format": "freshrec.two_tower.v1",
        "parent_version": "",
        "model": model,
        "trained_through": {"stream_sequence": 42, "event_time": 1_700_000_000.0},
        "metrics": {},
    }
    return files, manifest


def write(store: ModelStore, version: str, spec: Spec = Spec(), **changes: Any) -> str:
    """Builds and stores a version; returns its digest."""
    files, manifest = build(replace(spec, **changes) if changes else spec)
    return str(store.write_version(version, files, manifest).manifest["sha256"])
