"""The learner's checkpoint: everything a restarted trainer needs to learn exactly what one that
never stopped learns (weights, optimizer moments, id maps, histories, replay, preprocessing,
popularity and policy, random generators, stream positions), as one torch-serialised document.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from services.trainer.evaluation import Paired, Running
from services.trainer.learner import Learner, Position
from services.trainer.model import IdMap, ModelConfig, TwoTower
from services.trainer.replay import ReplayBuffer
from services.trainer.signals import Signals

logger = logging.getLogger(__name__)


def to_bytes(learner: Learner) -> bytes:
    doc: dict[str, Any] = {
        "format": 2,
        "config": learner.config.model.to_dict(),
        "model": learner.model.state_dict(),
        "trained": learner.trained.state_dict() if learner.averaging else None,
        "optimizer": learner.optimizer.state_dict(),
        "items": learner.items.state(),
        "item_counts": learner.item_counts.copy(),
        "users": learner.users.state(),
        "pending_users": dict(learner.pending_users),
        "categories": learner.categories.state(),
        "tags": learner.tags.state(),
        "contexts": learner.contexts.state(),
        "histories": {u: list(h) for u, h in learner.histories.items()},
        "seen": {u: sorted(r) for u, r in learner.seen.items()},
        "user_seen_at": dict(learner.user_seen_at),
        "user_last_sequence": dict(learner.user_last_sequence),
        "deleted_items": sorted(learner.deleted_items),
        "replay_waiting": {u: list(w) for u, w in learner.replay_waiting.items()},
        "replay": learner.replay.state(),
        "position": _stored_position(learner.position),
        "prequential": learner.prequential.state(),
        "served": learner.served.state(),
        "popularity": learner.popularity.state(),
        "policy": learner.policy.state(),
        "follow_ups": learner.follow_ups.state(),
        "gate": learner.gate.state(),
        "watch": learner.watch.state(),
        "signals": learner.signals.state(),
        "rng": learner.rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "skipped_steps": learner.skipped_steps,
    }
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    return buffer.getvalue()


def restore(learner: Learner, data: bytes) -> None:
    doc = torch.load(io.BytesIO(data), weights_only=False)
    if doc.get("format") != 2:
        raise ValueError("checkpoint format is not supported by this trainer version")
    stored = ModelConfig(**doc["config"])
    if stored != learner.config.model:
        logger.warning(
            "the checkpoint's model shape %s overrides the configured %s", stored, learner.config.model
        )
        learner.config = replace(learner.config, model=stored)
    learner.model = TwoTower.from_state_dict(stored, doc["model"])
    learner.trained = learner._trained_copy()
    if learner.averaging and doc.get("trained") is not None:
        learner.trained.load_state_dict(doc["trained"])
        learner._share_buffers(learner.trained)
    learner.optimizer = learner._new_optimizer()
    try:
        learner.optimizer.load_state_dict(doc["optimizer"])
    except ValueError as exc:
        logger.warning("the checkpoint's optimizer state does not fit (%s): moments restart", exc)
    learner.items = IdMap.from_state(doc["items"])
    learner.item_counts = np.asarray(doc["item_counts"], dtype=np.int64)
    learner.users = IdMap.from_state(doc["users"])
    learner.pending_users = dict(doc["pending_users"])
    learner.categories = IdMap.from_state(doc["categories"])
    learner.tags = IdMap.from_state(doc["tags"])
    learner.contexts = IdMap.from_state(doc["contexts"])
    length = learner.max_history
    learner.histories = {
        u: deque(((int(e[0]), int(e[1]), tuple(e[2])) for e in h), maxlen=length)
        for u, h in doc["histories"].items()
    }
    learner.seen = {u: set(r) for u, r in doc["seen"].items()}
    learner.user_seen_at = dict(doc["user_seen_at"])
    learner.deleted_items = set(doc.get("deleted_items", ()))
    learner.replay_waiting = {u: list(w) for u, w in doc.get("replay_waiting", {}).items()}
    learner.replay = ReplayBuffer(learner.config.replay_size, length, stored.max_context)
    learner.replay.load(doc["replay"])
    learner.position = _loaded_position(doc["position"])
    # Checkpoints from before users' newest sequences were kept: as recent as the position, so
    # retention forgets them once the log has moved past it.
    learner.user_last_sequence = {
        u: int(seq)
        for u, seq in doc.get(
            "user_last_sequence", dict.fromkeys(learner.user_seen_at, learner.position.stream_sequence)
        ).items()
    }
    learner.prequential = Running.from_state(doc["prequential"], learner.config.recent_window)
    if "served" in doc:
        learner.served = Running.from_state(doc["served"], learner.config.recent_window)
    if "popularity" in doc:
        learner.popularity.load(doc["popularity"])
        learner.policy.load(doc["policy"])
    if "follow_ups" in doc:
        learner.follow_ups.load(doc["follow_ups"])
    learner.gate = Paired.from_state(doc["gate"])
    learner.watch = Paired.from_state(doc["watch"])
    learner.signals = Signals(learner.config.preprocessing, stored.max_context)
    if "signals" in doc:
        learner.signals.load(doc["signals"])
    learner.rng = np.random.default_rng()
    learner.rng.bit_generator.state = doc["rng"]
    torch.set_rng_state(doc["torch_rng"])
    learner.skipped_steps = int(doc.get("skipped_steps", 0))
    learner.shadows = {}


# A stored name keeps the spelling it was first written with: checkpoints from before the code said
# "catalogue" (and the code that reads them after a rollback) name the position "catalog_sequence".
_STORED_NAMES = {"catalogue_sequence": "catalog_sequence"}


def _stored_position(position: Position) -> dict[str, Any]:
    return {_STORED_NAMES.get(name, name): value for name, value in position.__dict__.items()}


def _loaded_position(stored: dict[str, Any]) -> Position:
    names = {stored_name: name for name, stored_name in _STORED_NAMES.items()}
    return Position(**{names.get(name, name): value for name, value in stored.items()})
