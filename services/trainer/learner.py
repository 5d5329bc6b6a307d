"""Online learning: each micro-batch is first scored (prequential evaluation), then learned from.

All torch work for one learner happens on one thread at a time (the trainer's loop calls it
through ``asyncio.to_thread``), so training, export and checkpointing never overlap.
"""

from __future__ import annotations

import io
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from freshrec.v1 import event_pb2
from services.trainer.model import PAD, IdMap, TwoTower

#: Interactions that say the user did not want the item are not learned as positives.
NEGATIVE_TYPES = frozenset({event_pb2.EVENT_TYPE_DISLIKE})


@dataclass
class Prequential:
    """Running test-then-train figures."""

    evaluated: int = 0
    hits: int = 0
    ndcg: float = 0.0

    def as_metrics(self) -> dict[str, float]:
        if not self.evaluated:
            return {"prequential_evaluated": 0.0}
        return {
            "prequential_evaluated": float(self.evaluated),
            "prequential_hr@10": self.hits / self.evaluated,
            "prequential_ndcg@10": self.ndcg / self.evaluated,
        }


@dataclass
class LearnerState:
    """Everything a checkpoint must hold besides the weights and the optimizer."""

    item_map: IdMap = field(default_factory=IdMap)
    user_map: IdMap = field(default_factory=IdMap)
    histories: dict[str, deque[int]] = field(default_factory=dict)
    seen: dict[str, set[int]] = field(default_factory=dict)
    events_learned: int = 0
    stream_sequence: int = 0
    event_time: float = 0.0
    prequential: Prequential = field(default_factory=Prequential)


class OnlineLearner:
    def __init__(self, dim: int, max_history: int, learning_rate: float, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.dim = dim
        self.max_history = max_history
        self.learning_rate = learning_rate
        self.model = TwoTower(dim)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate)
        self.state = LearnerState()

    # -- learning ----------------------------------------------------------------------
    def history_rows(self, user_id: str) -> list[int]:
        """The user's recent item rows, oldest first, left-padded to max_history."""
        recent = list(self.state.histories.get(user_id, ()))[-self.max_history :]
        return [PAD] * (self.max_history - len(recent)) + recent

    def learn(self, batch: list[tuple[int, event_pb2.Event]]) -> int:
        """Scores, then learns from, the events after the current stream position; returns how many."""
        s = self.state
        fresh = [(seq, e) for seq, e in batch if seq > s.stream_sequence]
        if not fresh:
            return 0
        positives = [(seq, e) for seq, e in fresh if e.type not in NEGATIVE_TYPES]
        if positives:
            self._evaluate(positives)
            self._train(positives)
        for _seq, e in fresh:
            row = s.item_map.add(e.item_id)
            s.user_map.add(e.user_id)
            if e.type not in NEGATIVE_TYPES:
                s.histories.setdefault(e.user_id, deque(maxlen=self.max_history)).append(row)
                s.seen.setdefault(e.user_id, set()).add(row)
            s.event_time = max(s.event_time, e.occurred_at.seconds + e.occurred_at.nanos / 1e9)
        s.stream_sequence = fresh[-1][0]
        s.events_learned += len(fresh)
        return len(fresh)

    @torch.no_grad()
    def _evaluate(self, batch: list[tuple[int, event_pb2.Event]]) -> None:
        """Prequential HR@10/NDCG@10 over all known items, excluding each user's seen items."""
        s = self.state
        rows = len(s.item_map)
        if rows <= 1:
            s.prequential.evaluated += len(batch)  # nothing is known yet: every event is a miss
            return
        self.model.eval()
        history = torch.tensor([self.history_rows(e.user_id) for _, e in batch])
        users = torch.tensor([s.user_map.get(e.user_id) for _, e in batch])
        scores = self.model(history, users) @ self.model.item_matrix(rows).T
        scores[:, PAD] = -math.inf
        for i, (_, e) in enumerate(batch):
            s.prequential.evaluated += 1
            target = s.item_map.get(e.item_id)
            if target == PAD:
                continue  # an item never seen before cannot be ranked: a miss
            seen = [r for r in s.seen.get(e.user_id, ()) if r != target]
            if seen:
                scores[i, seen] = -math.inf
            rank = int((scores[i] > scores[i, target]).sum())
            if rank < 10:
                s.prequential.hits += 1
                s.prequential.ndcg += 1.0 / math.log2(rank + 2)

    def _train(self, batch: list[tuple[int, event_pb2.Event]]) -> None:
        s = self.state
        for _, e in batch:
            s.item_map.add(e.item_id)
            s.user_map.add(e.user_id)
        if self.model.ensure_capacity(len(s.item_map), len(s.user_map)):
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.learning_rate)
        self.model.train()
        history = torch.tensor([self.history_rows(e.user_id) for _, e in batch])
        users = torch.tensor([s.user_map.get(e.user_id) for _, e in batch])
        targets = torch.tensor([s.item_map.get(e.item_id) for _, e in batch])
        rows = len(s.item_map)
        logits = self.model(history, users) @ self.model.item_matrix(rows).T
        logits[:, PAD] = -1e9
        loss = F.cross_entropy(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    # -- checkpoints -------------------------------------------------------------------
    def checkpoint_bytes(self) -> bytes:
        s = self.state
        doc: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "item_ids": s.item_map.ids[1:],
            "user_ids": s.user_map.ids[1:],
            "histories": {u: list(h) for u, h in s.histories.items()},
            "seen": {u: sorted(r) for u, r in s.seen.items()},
            "events_learned": s.events_learned,
            "stream_sequence": s.stream_sequence,
            "event_time": s.event_time,
            "prequential": [s.prequential.evaluated, s.prequential.hits, s.prequential.ndcg],
        }
        buffer = io.BytesIO()
        torch.save(doc, buffer)
        return buffer.getvalue()

    def restore(self, data: bytes) -> None:
        doc = torch.load(io.BytesIO(data), weights_only=False)
        s = LearnerState(item_map=IdMap(doc["item_ids"]), user_map=IdMap(doc["user_ids"]))
        s.histories = {u: deque(h, maxlen=self.max_history) for u, h in doc["histories"].items()}
        s.seen = {u: set(r) for u, r in doc["seen"].items()}
        s.events_learned = doc["events_learned"]
        s.stream_sequence = doc["stream_sequence"]
        s.event_time = doc["event_time"]
        s.prequential = Prequential(*doc["prequential"])
        weights = doc["model"]
        self.model = TwoTower(self.dim, weights["items.weight"].shape[0], weights["users.weight"].shape[0])
        self.model.load_state_dict(weights)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.learning_rate)
        self.optimizer.load_state_dict(doc["optimizer"])
        self.state = s
