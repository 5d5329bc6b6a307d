"""What the trainer learns from an event: the seam to the shared preprocessing rules.

Each accepted event becomes at most one ``Interaction``: who, what, how strongly (a weight),
when and in which context. Events that say the user did not want the item are kept as
"seen" (never recommended back) but are not learned as positives.
"""

from __future__ import annotations

from dataclasses import dataclass

from freshrec.v1 import event_pb2

#: Interactions that say the user did not want the item: remembered as seen, never learned as positives.
NEGATIVE_TYPES = frozenset({event_pb2.EVENT_TYPE_DISLIKE})


@dataclass(frozen=True)
class Interaction:
    sequence: int
    user_id: str
    item_id: str
    type: int
    weight: float
    time: float
    context: tuple[str, ...] = ()

    @property
    def positive(self) -> bool:
        return self.weight > 0 and self.type not in NEGATIVE_TYPES


def event_time(event: event_pb2.Event) -> float:
    return event.occurred_at.seconds + event.occurred_at.nanos / 1e9


def context_keys(event: event_pb2.Event, limit: int) -> tuple[str, ...]:
    """The event's context as sorted ``key=value`` strings, at most ``limit`` of them."""
    if not limit or not event.context:
        return ()
    return tuple(sorted(f"{k}={v}" for k, v in event.context.items()))[:limit]


def to_interaction(sequence: int, event: event_pb2.Event, max_context: int = 0) -> Interaction:
    """One event as the trainer sees it (weight 1 for positive kinds, 0 for negative ones)."""
    weight = 0.0 if event.type in NEGATIVE_TYPES else 1.0
    return Interaction(
        sequence=sequence,
        user_id=event.user_id,
        item_id=event.item_id,
        type=int(event.type),
        weight=weight,
        time=event_time(event),
        context=context_keys(event, max_context),
    )
