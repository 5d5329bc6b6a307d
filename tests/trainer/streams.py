"""Event streams with patterns a model can learn, for the trainer's tests."""

from __future__ import annotations

from freshrec.v1 import event_pb2, item_pb2
from services.trainer.learner import Learner, LearnerConfig
from services.trainer.model import ModelConfig
from tests.factories import event

T0 = 1_700_000_000


def taste_stream(
    n_users: int = 40, rounds: int = 6, start_seq: int = 1, items: int = 60, prefix: str = "ab"
) -> list[tuple[int, event_pb2.Event]]:
    """Users in two groups, each walking round its group's ring of items one step per event from
    its own starting point: the next item follows from the last one (no repeats while rounds <= items)."""
    out = []
    seq = start_seq
    for r in range(rounds):
        for u in range(n_users):
            group = u % 2
            item = f"{prefix[group]}{(u * 7 + r) % items}"
            out.append((seq, event(f"u{u}", item, at=T0 + seq, event_id=f"e{seq}")))
            seq += 1
    return out


def small_learner(**overrides: object) -> Learner:
    model = {"dim": 16, "max_history": 10, "dropout": 0.1, "blocks": 1}
    model.update({k.removeprefix("model_"): v for k, v in overrides.items() if k.startswith("model_")})
    rest = {k: v for k, v in overrides.items() if not k.startswith("model_")}
    config = {"learning_rate": 0.01, "replay_size": 200, **rest}
    return Learner(LearnerConfig(model=ModelConfig(**model), **config))  # type: ignore[arg-type]


def catalogue_item(
    item_id: str, categories: list[str], tags: list[str] = (), title: str = ""
) -> item_pb2.Item:  # type: ignore[assignment]
    return item_pb2.Item(item_id=item_id, categories=categories, tags=list(tags), title=title or item_id)
