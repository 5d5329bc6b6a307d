"""In-memory user and item features, the state every read is served from.

The consumer applies events here and then persists the touched entries to SQL together with
the stream position, so memory and SQL always describe the same prefix of the stream.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from freshrec.v1 import event_pb2
from shared.preprocessing import PreprocessingSettings, Preprocessor


@dataclass
class Interaction:
    item_id: str
    type: int
    occurred_at: float  # event time, unix seconds
    weight: float


@dataclass
class UserState:
    recent: deque[Interaction]
    counts: Counter[str] = field(default_factory=Counter)
    last_event_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "recent": [[i.item_id, i.type, i.occurred_at, i.weight] for i in self.recent],
            "counts": dict(self.counts),
            "last_event_at": self.last_event_at,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], max_recent: int) -> UserState:
        return cls(
            recent=deque((Interaction(*r) for r in doc["recent"]), maxlen=max_recent),
            counts=Counter(doc["counts"]),
            last_event_at=doc["last_event_at"],
        )


@dataclass
class ItemState:
    popularity: float = 0.0
    counts: Counter[str] = field(default_factory=Counter)
    first_seen_at: float = 0.0
    last_seen_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "popularity": self.popularity,
            "counts": dict(self.counts),
            "first_seen_at": self.first_seen_at,
            "last_seen_at": self.last_seen_at,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ItemState:
        return cls(
            popularity=doc["popularity"],
            counts=Counter(doc["counts"]),
            first_seen_at=doc["first_seen_at"],
            last_seen_at=doc["last_seen_at"],
        )


@dataclass
class Watermark:
    stream_sequence: int = 0
    event_time: float = 0.0


class FeatureState:
    """Users, items and the stream watermark; the catalogue's categories for filtering."""

    def __init__(self, max_recent: int, preprocessing: PreprocessingSettings) -> None:
        self.max_recent = max_recent
        self.preprocessor = Preprocessor(preprocessing)
        self.users: dict[str, UserState] = {}
        self.items: dict[str, ItemState] = {}
        self.item_categories: dict[str, list[str]] = {}
        self.watermark = Watermark()

    def apply(self, event: event_pb2.Event, stream_sequence: int) -> bool:
        """Applies one event; returns False (and changes nothing) for one already applied."""
        if stream_sequence <= self.watermark.stream_sequence:
            return False
        ts = event.occurred_at.seconds + event.occurred_at.nanos / 1e9
        out = self.preprocessor.process(event.user_id, event.item_id, event.type, event.value, ts)
        self.watermark = Watermark(stream_sequence, max(self.watermark.event_time, ts))
        if not out.kept:
            return True
        weight = out.weight
        type_name = event_pb2.EventType.Name(event.type)

        user = self.users.get(event.user_id)
        if user is None:
            user = self.users[event.user_id] = UserState(recent=deque(maxlen=self.max_recent))
        user.recent.append(Interaction(event.item_id, event.type, ts, weight))
        user.counts[type_name] += 1
        user.last_event_at = max(user.last_event_at, ts)
        if not out.signal:
            return True

        item = self.items.get(event.item_id)
        if item is None:
            item = self.items[event.item_id] = ItemState(first_seen_at=ts, last_seen_at=ts)
        item.popularity += max(weight, 0.0)
        item.counts[type_name] += 1
        item.first_seen_at = min(item.first_seen_at, ts)
        item.last_seen_at = max(item.last_seen_at, ts)
        return True

    def popular(self, k: int, category: str = "") -> list[tuple[str, float]]:
        """The k items with the highest popularity, optionally within one category."""
        candidates: Iterable[tuple[str, ItemState]] = self.items.items()
        if category:
            candidates = ((i, s) for i, s in candidates if category in self.item_categories.get(i, ()))
        best = heapq.nlargest(k, candidates, key=lambda kv: (kv[1].popularity, kv[0]))
        return [(item_id, state.popularity) for item_id, state in best]


def to_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)
