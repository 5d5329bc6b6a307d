"""Decayed scores on a clock, a sliding trending window, and rankings that answer top-k
without sorting.

The clock is whatever counts the stream's progress; the feature service uses the stream
sequence (items) and a user's own event count (affinity), never seconds, so a half-life means
the same on a stream that spans twenty years and on a backfill replayed in a minute.

Decayed popularity is kept as a *clock-invariant log key*: a score ``s`` last updated at clock
``t`` with half-life ``H`` is stored as ``key = log2(s) + t / H``; its value at any clock ``T``
is ``2 ** (key - T / H)``. Two items' keys compare the same way their decayed scores do at
every common clock, so a ranking by key never needs re-sorting as the clock advances; adding a
weight is a log-sum-exp, so nothing overflows or underflows however many half-lives separate
the events, and a weight can be added at any clock, earlier ones included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from itertools import islice

from sortedcontainers import SortedList

NO_SCORE = -math.inf
_NOTHING: frozenset[str] = frozenset()


class Decay:
    """Exponentially decayed sums with one half-life in clock units (``0``: no decay, a plain sum)."""

    def __init__(self, half_life: float) -> None:
        self.half_life = half_life
        self.rate = 1.0 / half_life if half_life > 0 else 0.0

    def add(self, key: float, weight: float, t: float) -> float:
        """The key after adding ``weight`` at clock ``t`` (non-positive weights add nothing)."""
        if not weight > 0:
            return key
        new = math.log2(weight) + t * self.rate
        if key == NO_SCORE:
            return new
        hi, lo = (key, new) if key >= new else (new, key)
        return hi + math.log1p(2.0 ** (lo - hi)) / math.log(2.0)

    def value(self, key: float, at: float) -> float:
        """The decayed score at clock ``at`` (0 for no score; inf only if ``at`` is absurdly early)."""
        if key == NO_SCORE:
            return 0.0
        exponent = key - at * self.rate
        return 2.0**exponent if exponent < 1023 else math.inf


class Ranking:
    """Items ranked by a key, overall (category ``""``) and within each category.

    ``update`` is O(log n) per list the item is in; ``top`` reads the first k entries.
    """

    def __init__(self) -> None:
        self._lists: dict[str, SortedList[tuple[float, str]]] = {"": SortedList()}
        self._entries: dict[str, tuple[float, tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, item_id: str) -> float | None:
        entry = self._entries.get(item_id)
        return None if entry is None else entry[0]

    def update(self, item_id: str, key: float | None, categories: Iterable[str] = ()) -> None:
        """Places the item at ``key`` in the overall list and its categories' (None removes it)."""
        old = self._entries.pop(item_id, None)
        if old is not None:
            old_key, old_categories = old
            for name in ("", *old_categories):
                self._lists[name].remove((-old_key, item_id))
                if name and not self._lists[name]:
                    del self._lists[name]
        if key is None or key == NO_SCORE:
            return
        cats = tuple(dict.fromkeys(c for c in categories if c))
        self._entries[item_id] = (key, cats)
        for name in ("", *cats):
            entries = self._lists.get(name)
            if entries is None:
                entries = self._lists[name] = SortedList()
            entries.add((-key, item_id))

    def categories(self, item_id: str) -> tuple[str, ...]:
        entry = self._entries.get(item_id)
        return () if entry is None else entry[1]

    def top(self, k: int, category: str = "") -> Iterator[tuple[str, float]]:
        """The k best ``(item_id, key)``, best first; ties by item id."""
        entries = self._lists.get(category)
        if not entries:
            return iter(())
        return ((item_id, -neg) for neg, item_id in islice(entries, k))


class TrendingWindow:
    """Weighted event counts per item over the last ``span`` units of a clock.

    The window is cut into ``buckets`` slices; an item's trending score is the sum of its
    slices newer than ``newest clock - span``. As the clock advances, expired slices are
    dropped and their items reported for re-ranking (each event's slice expires once, so the
    work is constant per event). Weights older than the window are not counted.
    """

    def __init__(self, span: float, buckets: int) -> None:
        self.width = span / buckets
        self.buckets = buckets
        self.current: int | None = None  # slice of the newest clock seen
        #: Where the slice after ``current`` begins: below it ``advance`` has nothing to do.
        self.next_start = -math.inf
        self._holders: dict[int, set[str]] = {}  # slice -> items with a count in it

    def slice_of(self, t: float) -> int:
        return math.floor(t / self.width)

    def live(self, index: int) -> bool:
        return self.current is None or index > self.current - self.buckets

    def add(self, item_id: str, slices: dict[int, float], weight: float, t: float) -> bool:
        """Adds ``weight`` to the item's slice for ``t``; False when ``t`` is outside the window."""
        index = self.slice_of(t)
        if not weight > 0 or not self.live(index):
            return False
        slices[index] = slices.get(index, 0.0) + weight
        holders = self._holders.get(index)
        if holders is None:
            holders = self._holders[index] = set()
        holders.add(item_id)
        return True

    def expiring(self, t: float) -> AbstractSet[str]:
        """The items whose score ``advance(t)`` would lower (what it is about to change)."""
        index = self.slice_of(t)
        if self.current is None or index <= self.current:
            return _NOTHING
        horizon = index - self.buckets
        return set().union(*(items for s, items in self._holders.items() if s <= horizon))

    def advance(self, t: float, slices_of: Callable[[str], dict[int, float] | None]) -> AbstractSet[str]:
        """Moves the window's end to clock ``t`` (if later); returns the items whose score fell."""
        index = self.slice_of(t)
        if self.current is not None and index <= self.current:
            return _NOTHING
        self.current = index
        self.next_start = (index + 1) * self.width
        horizon = index - self.buckets
        changed: set[str] = set()
        for old in [s for s in self._holders if s <= horizon]:
            for item_id in self._holders.pop(old):
                slices = slices_of(item_id)
                if slices is not None and slices.pop(old, None) is not None:
                    changed.add(item_id)
        return changed

    def restore(self, newest: float | None, items: Iterable[tuple[str, dict[int, float]]]) -> None:
        """Rebuilds the bookkeeping from persisted slices and the newest clock, dropping the
        slices that had left the window (an item is not written again when its slices expire,
        so its stored document may still hold them)."""
        self.current = None if newest is None else self.slice_of(newest)
        self.next_start = -math.inf if self.current is None else (self.current + 1) * self.width
        self._holders = {}
        for item_id, slices in items:
            for index in [i for i in slices if not self.live(i)]:
                del slices[index]
            for index in slices:
                self._holders.setdefault(index, set()).add(item_id)

    @staticmethod
    def score(slices: dict[int, float]) -> float:
        # Summed fresh (not kept as a running total) so removals leave no rounding residue.
        return math.fsum(slices.values())
