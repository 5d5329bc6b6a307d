"""Exported versions inside the trainer: snapshots of their weights, shadows that score beside the
learner, and rebasing learning onto a version's weights (rollback, promotion, rejection).

A snapshot keeps the weights with the ids their rows belonged to; a shadow is that version mapped
into the learner's current rows, so it scores the same requests as the learner, exactly as its
export serves them (the items and users it never knew have no rows).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from services.trainer.model import ModelConfig, TwoTower
from services.trainer.policy import MODEL

if TYPE_CHECKING:
    from services.trainer.learner import Learner


@dataclass
class Shadow:
    """A frozen copy of an exported version, scored beside the learner on the same events."""

    version: str
    model: TwoTower
    table: torch.Tensor  # item vectors of the rows it knows (zero elsewhere)
    known: torch.Tensor  # bool per row
    #: The popularity columns it was exported with (in the current rows) and its serving policy.
    popularity: np.ndarray | None = None
    policy: dict[str, str] = field(default_factory=dict)
    #: Its follow-up table (items [rows, width], counts), in the current rows.
    follow_ups: tuple[np.ndarray, np.ndarray] | None = None


def snapshot(learner: Learner) -> dict[str, Any]:
    """The weights of an exported version with the ids their rows belong to."""
    return {
        "config": learner.config.model.to_dict(),
        "model": {k: v.clone() for k, v in learner.model.state_dict().items()},
        "items": list(learner.items.ids),
        "users": list(learner.users.ids),
        "categories": list(learner.categories.ids),
        "tags": list(learner.tags.ids),
        "contexts": list(learner.contexts.ids),
        "popularity": learner.popularity.columns(learner.items.capacity_needed).astype(np.float32),
        "policy": learner.policy.choice(),
        "follow_ups": learner.follow_ups.table(learner.items.capacity_needed),
    }


def _mapped(learner: Learner, snapshot: dict[str, Any], into: TwoTower) -> torch.Tensor:
    """Copies a snapshot's weights into ``into`` row by id; returns which item rows it knew."""
    old = TwoTower.from_state_dict(ModelConfig(**snapshot["config"]), snapshot["model"])
    with torch.no_grad():
        for name, param in old.named_parameters():
            if not name.endswith(".weight") or name.split(".")[0] not in {
                "item_ids",
                "user_ids",
                "categories",
                "tags",
                "contexts",
            }:
                dict(into.named_parameters())[name].copy_(param)
        known = torch.zeros(into.item_ids.num_embeddings, dtype=torch.bool)
        for table, key, idmap in (
            ("item_ids", "items", learner.items),
            ("user_ids", "users", learner.users),
            ("categories", "categories", learner.categories),
            ("tags", "tags", learner.tags),
            ("contexts", "contexts", learner.contexts),
        ):
            pairs = [(idmap.rows[i], r) for r, i in enumerate(snapshot[key]) if r and i in idmap.rows]
            if not pairs:
                continue
            new_rows = torch.tensor([a for a, _ in pairs])
            old_rows = torch.tensor([b for _, b in pairs])
            getattr(into, table).weight[new_rows] = getattr(old, table).weight[old_rows]
            if table == "item_ids":
                known[new_rows] = True
                into.item_learned[new_rows] = old.item_learned[old_rows]
    return known


def make_shadow(learner: Learner, version: str, snapshot: dict[str, Any]) -> Shadow:
    model = copy.deepcopy(learner.model)
    with torch.no_grad():  # users the version never knew have no row in its export
        model.user_ids.weight.zero_()
    known = _mapped(learner, snapshot, model)
    model.eval()
    with torch.no_grad():
        table = model.item_vectors(len(known)) * known[:, None]
    # The snapshot's rows in the current ones, by item id (0: an item no longer held).
    old_ids = snapshot["items"]
    to_now = np.array(
        [learner.items.rows.get(i, 0) if r else 0 for r, i in enumerate(old_ids)], dtype=np.int64
    )
    held = (to_now > 0) & (to_now < len(known))
    popularity = None
    if snapshot.get("popularity") is not None:
        old = np.asarray(snapshot["popularity"])
        popularity = np.zeros((len(known), old.shape[1]), dtype=np.float32)
        rows = np.flatnonzero(held[: len(old)])
        popularity[to_now[rows]] = old[rows]
    follow_ups = None
    if snapshot.get("follow_ups") is not None:
        items, counts = (np.asarray(a) for a in snapshot["follow_ups"])
        mapped = np.where(items < len(to_now), to_now[np.minimum(items, len(to_now) - 1)], 0)
        new_items = np.zeros((len(known), items.shape[1]), dtype=np.int64)
        new_counts = np.zeros((len(known), items.shape[1]), dtype=np.float32)
        rows = np.flatnonzero(held[: len(items)])
        new_items[to_now[rows]] = mapped[rows]
        new_counts[to_now[rows]] = np.where(mapped[rows] > 0, counts[rows], 0.0)
        follow_ups = (new_items, new_counts)
    return Shadow(version, model, table, known, popularity, dict(snapshot.get("policy", {})), follow_ups)


def rebase(learner: Learner, snapshot: dict[str, Any]) -> None:
    """Continues from an exported version's weights (rollback, rejection); moments restart."""
    _mapped(learner, snapshot, learner.model)
    learner.policy.forget(MODEL)
    if learner.averaging:
        learner.trained.load_state_dict(learner.model.state_dict())
    learner.optimizer = learner._new_optimizer()
