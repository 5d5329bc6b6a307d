"""In-memory user and item features, the state every read is served from.

The consumer applies events here in stream order, then persists what changed (the "dirty"
users and items) to SQL together with the stream position, so memory and SQL describe the
same prefix of the stream. Decay and the trending window count events, not seconds (item
popularity on the stream sequence, a user's category affinity on that user's own events), so
they mean the same however fast the stream's clock runs; the preprocessing rules run on event
time. Everything the state holds is persisted exactly (floats round-trip through JSON), so a
restart or a replay of the stream reaches the same state as living through it.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import orjson

from freshrec.v1 import event_pb2, item_pb2
from services.feature.popularity import NO_SCORE, Decay, Ranking, TrendingWindow
from services.feature.settings import PopularitySettings
from shared.preprocessing import PreprocessingSettings, Preprocessor

_TYPE_NAMES = {v.number: v.name for v in event_pb2.EventType.DESCRIPTOR.values}


#: One recent interaction: (item_id, type, occurred_at unix seconds, preprocessed weight,
#: normalised rating or None, accepted_at unix seconds: when JetStream stored the event, what
#: retention counts from). A plain tuple of plain values, which the garbage collector stops
#: tracking; tens of thousands of objects would otherwise lengthen every full collection.
Interaction = tuple[str, int, float, float, float | None, float]


class UserState:
    __slots__ = (
        "recent",
        "counts",
        "last_event_at",
        "last_accepted_at",
        "affinity",
        "affinity_clock",
        "seen",
    )

    def __init__(self, max_recent: int) -> None:
        self.recent: deque[Interaction] = deque(maxlen=max_recent)
        self.counts: dict[str, int] = {}
        self.last_event_at = 0.0
        self.last_accepted_at = 0.0  # when the user's newest event was accepted
        self.affinity: dict[str, float] = {}  # category -> decay key on affinity_clock
        self.affinity_clock = 0  # the user's kept events that carried a positive weight
        #: Every item touched -> when the last event touching it was accepted, least recently
        #: touched first, capped at ``max_seen``.
        self.seen: dict[str, float] = {}

    def to_json(self) -> dict[str, Any]:
        return {
            "recent": tuple(self.recent),  # tuples serialise as JSON arrays
            "counts": dict(self.counts),
            "last_event_at": self.last_event_at,
            "last_accepted_at": self.last_accepted_at,
            "affinity": dict(self.affinity),
            "affinity_clock": self.affinity_clock,
            "seen": tuple(self.seen.items()),
        }

    def touch(self, item_id: str, max_seen: int, accepted_at: float) -> None:
        if not max_seen:
            return
        seen = self.seen
        if seen.pop(item_id, None) is None:
            item_id = sys.intern(item_id)
        seen[item_id] = accepted_at  # to the end: the most recently touched
        if len(seen) > max_seen:
            del seen[next(iter(seen))]

    def expire(self, cutoff: float) -> bool:
        """Forgets the interactions and touched items accepted before ``cutoff``; True if any went."""
        recent, seen = self.recent, self.seen
        n = len(recent) + len(seen)
        while recent and recent[0][5] < cutoff:
            recent.popleft()
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] >= cutoff:
                break
            del seen[oldest]
        return len(recent) + len(seen) < n

    @classmethod
    def from_json(cls, doc: dict[str, Any], max_recent: int) -> UserState:
        user = cls(max_recent)
        user.recent.extend(tuple(r) for r in doc["recent"])
        user.seen = {sys.intern(str(i)): float(t) for i, t in doc["seen"]}
        user.counts = {str(k): int(v) for k, v in doc["counts"].items()}
        user.last_event_at = float(doc["last_event_at"])
        user.last_accepted_at = float(doc["last_accepted_at"])
        user.affinity = {str(k): float(v) for k, v in doc.get("affinity", {}).items()}
        user.affinity_clock = int(doc.get("affinity_clock", 0))
        return user


class ItemState:
    __slots__ = ("popularity", "counts", "first_seen_at", "last_seen_at", "trending")

    def __init__(self, t: float) -> None:
        self.popularity = NO_SCORE  # decay key of popularity on the stream sequence
        self.counts: dict[str, int] = {}
        self.first_seen_at = t
        self.last_seen_at = t
        self.trending: dict[int, float] = {}  # trending-window slice (of stream sequence) -> weight

    def to_json(self) -> dict[str, Any]:
        return {
            "popularity": None if self.popularity == NO_SCORE else self.popularity,
            "counts": dict(self.counts),
            "first_seen_at": self.first_seen_at,
            "last_seen_at": self.last_seen_at,
            "trending": {str(k): v for k, v in self.trending.items()},
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ItemState:
        item = cls(float(doc["first_seen_at"]))
        item.popularity = NO_SCORE if doc["popularity"] is None else float(doc["popularity"])
        item.counts = {str(k): int(v) for k, v in doc["counts"].items()}
        item.last_seen_at = float(doc["last_seen_at"])
        item.trending = {int(k): float(v) for k, v in doc.get("trending", {}).items()}
        return item


@dataclass
class Watermark:
    stream_sequence: int = 0
    event_time: float = 0.0


@dataclass
class Snapshot:
    """Users and items as JSON text at one watermark (what one commit writes)."""

    watermark: Watermark
    pending_users: set[str]
    pending_items: set[str]
    #: Users gone since the last snapshot (expired): their rows are deleted.
    deleted_users: set[str] = field(default_factory=set)
    users: dict[str, str] = field(default_factory=dict)
    items: dict[str, str] = field(default_factory=dict)


class FeatureState:
    """Users, items, rankings and the stream watermark; the catalogue's categories."""

    def __init__(
        self,
        max_recent: int,
        preprocessing: PreprocessingSettings | None = None,
        popularity: PopularitySettings | None = None,
        max_seen: int = 10_000,
    ) -> None:
        self.max_recent = max_recent
        self.max_seen = max_seen
        self.popularity_settings = popularity or PopularitySettings()
        self.preprocessor = Preprocessor(preprocessing)
        self.users: dict[str, UserState] = {}
        self.items: dict[str, ItemState] = {}
        #: Catalogue categories per item, and the catalogue revision they came from.
        self.item_categories: dict[str, tuple[str, ...]] = {}
        self.catalogue_revisions: dict[str, int] = {}
        #: Catalogue entries served nowhere: hidden ones, and when each of the others expires.
        self.hidden_items: set[str] = set()
        self.available_until: dict[str, float] = {}
        self.watermark = Watermark()
        p = self.popularity_settings
        self.all_time = Decay(p.half_life_events)
        self.affinity_decay = Decay(p.affinity_half_life_events)
        self.trending_window = TrendingWindow(p.trending_window_events, p.trending_buckets)
        self.ranking_all_time = Ranking()
        self.ranking_trending = Ranking()
        #: Changed since the last snapshot began (what the next commit must write).
        self.dirty_users: set[str] = set()
        self.dirty_items: set[str] = set()
        self.deleted_users: set[str] = set()
        #: The snapshot being serialised, if any (see ``begin_snapshot``).
        self._snapshot: Snapshot | None = None
        #: Changed since the rankings were last brought up to date.
        self._unranked: set[str] = set()

    # -- applying events -------------------------------------------------------------------

    def apply(self, event: event_pb2.Event, stream_sequence: int, accepted_at: float | None = None) -> bool:
        """Applies one event stored at ``stream_sequence`` at ``accepted_at`` (Unix seconds; by
        default its event time, for callers without a stream); returns False (and changes
        nothing) for one already applied."""
        if stream_sequence <= self.watermark.stream_sequence:
            return False
        ts = event.occurred_at.seconds + event.occurred_at.nanos / 1e9
        if accepted_at is None:
            accepted_at = ts
        user_id, item_id = event.user_id, event.item_id
        snapshot = self._snapshot
        if snapshot is not None:
            # Copy on write: what the snapshot still has to serialise is serialised before
            # this event changes it, including the items whose trending slices it expires.
            if user_id in snapshot.pending_users:
                snapshot.pending_users.discard(user_id)
                snapshot.users[user_id] = orjson.dumps(self.user_doc(user_id)).decode()
            trending = self.trending_window
            steps = stream_sequence >= trending.next_start
            for changing in (item_id, *trending.expiring(stream_sequence)) if steps else (item_id,):
                if changing in snapshot.pending_items:
                    snapshot.pending_items.discard(changing)
                    snapshot.items[changing] = orjson.dumps(self.items[changing].to_json()).decode()
        out = self.preprocessor.process(user_id, item_id, event.type, event.value, ts)
        watermark = self.watermark
        watermark.stream_sequence = stream_sequence
        if ts > watermark.event_time:
            watermark.event_time = ts
        if stream_sequence >= self.trending_window.next_start:  # into a new slice (rare)
            expired = self.trending_window.advance(stream_sequence, self._trending_slices)
            if expired:
                self._unranked |= expired

        self.dirty_users.add(user_id)  # the preprocessing state changed in any case
        user = self.users.get(user_id)
        if user is None:
            user = self.users[user_id] = UserState(self.max_recent)
            self.deleted_users.discard(user_id)
        if accepted_at > user.last_accepted_at:
            user.last_accepted_at = accepted_at
        if not out.kept:
            return True
        weight = out.weight
        type_name = _TYPE_NAMES.get(event.type, str(event.type))
        user.recent.append((item_id, event.type, ts, weight, out.normalized_rating, accepted_at))
        user.touch(item_id, self.max_seen, accepted_at)
        user.counts[type_name] = user.counts.get(type_name, 0) + 1
        if ts > user.last_event_at:
            user.last_event_at = ts
        if weight > 0:
            user.affinity_clock += 1
            for category in self.item_categories.get(item_id, ()):
                user.affinity[category] = self.affinity_decay.add(
                    user.affinity.get(category, NO_SCORE), weight, user.affinity_clock
                )
        if not out.signal:
            return True  # a likely bot: kept out of item popularity

        item = self.items.get(item_id)
        if item is None:
            item = self.items[item_id] = ItemState(ts)
        item.counts[type_name] = item.counts.get(type_name, 0) + 1
        if ts < item.first_seen_at:
            item.first_seen_at = ts
        if ts > item.last_seen_at:
            item.last_seen_at = ts
        if weight > 0:
            item.popularity = self.all_time.add(item.popularity, weight, stream_sequence)
            self.trending_window.add(item_id, item.trending, weight, stream_sequence)
            self._unranked.add(item_id)
        self.dirty_items.add(item_id)
        return True

    def _trending_slices(self, item_id: str) -> dict[int, float] | None:
        item = self.items.get(item_id)
        return None if item is None else item.trending

    # -- retention ---------------------------------------------------------------------------

    def expire_users(self, user_ids: Iterable[str], cutoff: float) -> tuple[int, int]:
        """Applies the retention to these users: a user whose newest event was accepted before
        ``cutoff`` is forgotten whole (features, preprocessing state, row); others lose the
        interactions and touched items accepted before it. Returns (trimmed, forgotten)."""
        trimmed = forgotten = 0
        snapshot = self._snapshot
        for user_id in user_ids:
            user = self.users.get(user_id)
            if user is None:
                continue
            whole = user.last_accepted_at < cutoff
            if not whole and not (
                (user.recent and user.recent[0][5] < cutoff)
                or (user.seen and next(iter(user.seen.values())) < cutoff)
            ):
                continue
            if snapshot is not None and user_id in snapshot.pending_users:
                # Copy on write, as in ``apply``: the snapshot shows the user at its watermark.
                snapshot.pending_users.discard(user_id)
                snapshot.users[user_id] = orjson.dumps(self.user_doc(user_id)).decode()
            if whole:
                del self.users[user_id]
                self.preprocessor.forget_user(user_id)
                self.dirty_users.discard(user_id)
                self.deleted_users.add(user_id)
                forgotten += 1
            elif user.expire(cutoff):
                self.dirty_users.add(user_id)
                trimmed += 1
        return trimmed, forgotten

    def forget_user(self, user_id: str) -> bool:
        """Forgets a user whole on request (features, preprocessing state, and the row at the next
        commit), as the retention does for a user with nothing recent; a snapshot in progress
        leaves them out. Returns whether the user was held. Doing it again changes nothing."""
        snapshot = self._snapshot
        if snapshot is not None:
            snapshot.pending_users.discard(user_id)
            snapshot.users.pop(user_id, None)
            snapshot.deleted_users.add(user_id)
        held = self.users.pop(user_id, None) is not None
        self.preprocessor.forget_user(user_id)
        self.dirty_users.discard(user_id)
        self.deleted_users.add(user_id)
        return held

    # -- the catalogue -----------------------------------------------------------------------

    def set_categories(self, item_id: str, categories: Iterable[str], revision: int) -> bool:
        """Records an item's catalogue categories (an older revision than the one held is ignored)."""
        if revision < self.catalogue_revisions.get(item_id, -1):
            return False
        self.catalogue_revisions[item_id] = revision
        cats = tuple(dict.fromkeys(c for c in categories if c))
        if self.item_categories.get(item_id) != cats:
            self.item_categories[item_id] = cats
            self._unranked.add(item_id)
        return True

    def set_catalogue_entry(self, item: item_pb2.Item, revision: int) -> bool:
        """Records a catalogue entry's categories and availability, or forgets a deleted item
        (``item.deleted``): its statistics, rankings and categories. An older revision than the
        one held is ignored."""
        item_id = item.item_id
        if item.deleted:
            if revision < self.catalogue_revisions.get(item_id, -1):
                return False
            self.catalogue_revisions[item_id] = revision
            self.forget_item(item_id)
            return True
        if not self.set_categories(item_id, item.categories, revision):
            return False
        if item.hidden:
            self.hidden_items.add(item_id)
        else:
            self.hidden_items.discard(item_id)
        if item.HasField("available_until"):
            until = item.available_until
            self.available_until[item_id] = until.seconds + until.nanos / 1e9
        else:
            self.available_until.pop(item_id, None)
        return True

    def forget_item(self, item_id: str) -> None:
        """Drops everything held about an item (its catalogue revision stays, so an older entry
        read late does not bring it back)."""
        self.items.pop(item_id, None)
        self.item_categories.pop(item_id, None)
        self.hidden_items.discard(item_id)
        self.available_until.pop(item_id, None)
        self.dirty_items.discard(item_id)
        snapshot = self._snapshot
        if snapshot is not None:
            snapshot.pending_items.discard(item_id)
            snapshot.items.pop(item_id, None)
        self._unranked.add(item_id)

    def servable(self, item_id: str, now: float) -> bool:
        """False for an item hidden or past its ``available_until`` (wall clock ``now``)."""
        return item_id not in self.hidden_items and self.available_until.get(item_id, math.inf) > now

    # -- reads -------------------------------------------------------------------------------

    def rank(self) -> None:
        """Brings the rankings up to date with every change since the last call."""
        if not self._unranked:
            return
        for item_id in self._unranked:
            item = self.items.get(item_id)
            cats = self.item_categories.get(item_id, ())
            if item is None:
                self.ranking_all_time.update(item_id, None)
                self.ranking_trending.update(item_id, None)
                continue
            self.ranking_all_time.update(item_id, item.popularity, cats)
            trending = TrendingWindow.score(item.trending)
            self.ranking_trending.update(item_id, trending if trending > 0 else None, cats)
        self._unranked.clear()

    def popular(
        self, k: int, category: str = "", trending: bool = False, now: float | None = None
    ) -> list[tuple[str, float]]:
        """The k most popular items (optionally within one category), best first, with scores;
        hidden and expired items (at wall clock ``now``) are skipped."""
        self.rank()
        ranking = self.ranking_trending if trending else self.ranking_all_time
        ranked: Iterable[tuple[str, float]] = ranking.top(len(ranking), category)
        if self.hidden_items or self.available_until:
            at_now = time.time() if now is None else now
            ranked = ((i, key) for i, key in ranked if self.servable(i, at_now))
        top = list(islice(ranked, k))
        if trending:
            return top
        at = self.watermark.stream_sequence
        return [(i, self.all_time.value(key, at)) for i, key in top]

    def item_popularity(self, item: ItemState) -> float:
        return self.all_time.value(item.popularity, self.watermark.stream_sequence)

    def affinities(self, user: UserState) -> dict[str, float]:
        at = user.affinity_clock
        return {c: self.affinity_decay.value(key, at) for c, key in user.affinity.items()}

    def is_likely_bot(self, user_id: str) -> bool:
        return self.preprocessor.is_likely_bot(user_id)

    # -- persistence -------------------------------------------------------------------------

    def user_doc(self, user_id: str) -> dict[str, Any]:
        doc = self.users[user_id].to_json()
        doc["pre"] = self.preprocessor.export_user(user_id)
        return doc

    def begin_snapshot(self) -> Snapshot:
        """Starts a snapshot of what changed since the last one (users, items, position) and
        clears the dirty sets; ``snapshot_step`` serialises it a slice at a time.

        Events may be applied while a snapshot is in progress: ``apply`` serialises a pending
        user or item before changing it, so every document shows the state at the snapshot's
        watermark. The consumer thus never stops applying for longer than one slice. The
        documents are JSON text at once: strings cost the garbage collector nothing, where
        thousands of dicts and lists alive during a commit would be promoted and bring the
        full collections that stall the loop.
        """
        if self._snapshot is not None:
            raise RuntimeError("a snapshot is already in progress")
        snapshot = self._snapshot = Snapshot(
            Watermark(self.watermark.stream_sequence, self.watermark.event_time),
            pending_users=self.dirty_users,
            pending_items=self.dirty_items,
            deleted_users=self.deleted_users,
        )
        self.dirty_users = set()
        self.dirty_items = set()
        self.deleted_users = set()
        return snapshot

    def snapshot_step(self, most: int | None = 256) -> bool:
        """Serialises up to ``most`` (None: all) pending documents of the snapshot in progress;
        True once it is complete (and no longer in progress)."""
        snapshot = self._snapshot
        if snapshot is None:
            return True
        dumps = orjson.dumps
        users, items = snapshot.pending_users, snapshot.pending_items
        n = len(users) + len(items) if most is None else most
        while users and n > 0:
            u = users.pop()
            snapshot.users[u] = dumps(self.user_doc(u)).decode()
            n -= 1
        while items and n > 0:
            i = items.pop()
            snapshot.items[i] = dumps(self.items[i].to_json()).decode()
            n -= 1
        if users or items:
            return False
        self._snapshot = None
        return True

    def abandon_snapshot(self) -> None:
        """Drops the snapshot in progress (its changes are not marked dirty again)."""
        self._snapshot = None

    def take_dirty(self) -> tuple[dict[str, str], dict[str, str], Watermark, set[str]]:
        """A whole snapshot at once: (users, items, position, users deleted), documents as JSON text."""
        snapshot = self.begin_snapshot()
        self.snapshot_step(None)
        return snapshot.users, snapshot.items, snapshot.watermark, snapshot.deleted_users

    def restore_user(self, user_id: str, doc: dict[str, Any]) -> None:
        self.users[user_id] = UserState.from_json(doc, self.max_recent)
        if doc.get("pre") is not None:
            self.preprocessor.import_user(user_id, doc["pre"])

    def restore_item(self, item_id: str, doc: dict[str, Any]) -> None:
        self.items[item_id] = ItemState.from_json(doc)
        self._unranked.add(item_id)

    def finish_restore(self, watermark: Watermark) -> None:
        """Called once after ``restore_*``: sets the position and derived bookkeeping."""
        self.watermark = watermark
        self.trending_window.restore(
            watermark.stream_sequence if watermark.stream_sequence else None,
            ((i, s.trending) for i, s in self.items.items()),
        )
        self.dirty_users.clear()
        self.dirty_items.clear()
        self.deleted_users.clear()
        self.rank()

    def dump(self) -> dict[str, Any]:
        """Everything the state holds, canonically (tests compare states with it)."""
        self.rank()
        return {
            "watermark": [self.watermark.stream_sequence, self.watermark.event_time],
            "users": {u: self.user_doc(u) for u in sorted(self.users)},
            "items": {i: self.items[i].to_json() for i in sorted(self.items)},
            "popular": self.popular(1000),
            "trending": self.popular(1000, trending=True),
        }
