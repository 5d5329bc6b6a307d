"""What the trainer learns from an event: the shared preprocessing rules, applied in stream order.

``shared.preprocessing`` decides, for the feature service and the trainer alike, each event's
weight (event type, per-user normalised rating), whether it is a rapid repeat (dropped) and
whether its user is a likely bot (kept out of training). Each surviving event becomes one
``Interaction``; one with a weight of zero or less (a dislike) is remembered as seen, so it is
never recommended back, but not learned as a positive.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from freshrec.v1 import event_pb2
from shared.preprocessing import PreprocessingSettings, Preprocessor, event_time_s


@dataclass(frozen=True)
class Interaction:
    sequence: int
    user_id: str
    item_id: str
    type: int
    weight: float
    time: float
    context: tuple[str, ...] = ()
    #: The producer call it came in (``Freshrec-Received-Us``; 0 unknown): see ``scoring.py``.
    call: int = 0

    @property
    def positive(self) -> bool:
        return self.weight > 0


def context_keys(event: event_pb2.Event, limit: int) -> tuple[str, ...]:
    """The event's context as sorted ``key=value`` strings, at most ``limit`` of them."""
    if not limit or not event.context:
        return ()
    return tuple(sorted(f"{k}={v}" for k, v in event.context.items()))[:limit]


class Signals:
    """Turns stream events into interactions; its state travels in the learner's checkpoint."""

    def __init__(self, settings: PreprocessingSettings | None = None, max_context: int = 0) -> None:
        self.preprocessor = Preprocessor(settings)
        self.max_context = max_context

    def interaction(self, sequence: int, event: event_pb2.Event) -> Interaction | None:
        """The event as learned, or None for a collapsed repeat or a likely bot's event."""
        processed = self.preprocessor.process_event(event)
        if not processed.signal:
            return None
        return Interaction(
            sequence=sequence,
            user_id=event.user_id,
            item_id=event.item_id,
            type=int(event.type),
            weight=processed.weight,
            time=event_time_s(event),
            context=context_keys(event, self.max_context),
        )

    def interactions(self, events: Iterable[tuple[int, event_pb2.Event]]) -> list[Interaction]:
        return [i for i in (self.interaction(seq, e) for seq, e in events) if i is not None]

    def state(self) -> dict[str, Any]:
        return self.preprocessor.state_dict()

    def load(self, state: dict[str, Any]) -> None:
        self.preprocessor.load_state_dict(state)
