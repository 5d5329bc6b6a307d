"""A synthetic world with known tastes that drift: the data ``freshrec demo`` streams.

Users fall into taste groups; items fall into categories. Each group prefers one category at a
time: with probability ``affinity`` a user's next event is on an item of the group's category
(popular items more often), otherwise on any item. A *drift* moves every group to a different
category at once, so a recommender that learns online should recover after each drift while a
frozen one keeps recommending the old taste. Everything is seeded: the same seed gives the same
catalogue, the same users and the same event sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

ADJECTIVES = (
    "Quiet",
    "Bright",
    "Hidden",
    "Electric",
    "Golden",
    "Broken",
    "Silver",
    "Wild",
    "Last",
    "Northern",
)
NOUNS = ("River", "Signal", "Garden", "Machine", "Harbour", "Letter", "Forest", "Engine", "Island", "Echo")
CATEGORY_NAMES = ("drama", "comedy", "scifi", "documentary", "thriller", "animation", "romance", "horror")


@dataclass(frozen=True)
class SyntheticItem:
    item_id: str
    title: str
    category: str


@dataclass(frozen=True)
class SyntheticEvent:
    user_id: str
    item_id: str
    kind: str  # "click" or "purchase"


@dataclass
class SyntheticWorld:
    """Users in ``groups`` taste groups, items in ``categories`` categories, tastes that drift."""

    users: int = 300
    items: int = 400
    groups: int = 4
    categories: int = 6
    affinity: float = 0.85
    purchase_share: float = 0.1
    seed: int = 0
    phase: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not (1 <= self.groups <= self.categories):
            raise ValueError("need 1 <= groups <= categories so every group can have its own taste")
        if self.items < self.categories:
            raise ValueError("need at least one item per category")
        if not 0.0 <= self.affinity <= 1.0:
            raise ValueError("affinity is a probability")
        self._rng = random.Random(self.seed)
        self.category_names = [
            CATEGORY_NAMES[c] if c < len(CATEGORY_NAMES) else f"category-{c}" for c in range(self.categories)
        ]
        self.catalogue = [
            SyntheticItem(
                item_id=f"item-{i:05d}",
                title=f"{ADJECTIVES[(i // 10) % 10]} {NOUNS[i % 10]} {i}",
                category=self.category_names[i % self.categories],
            )
            for i in range(self.items)
        ]
        self.by_category: dict[str, list[str]] = {name: [] for name in self.category_names}
        for item in self.catalogue:
            self.by_category[item.category].append(item.item_id)
        # Zipf-like popularity inside each category: the first items are picked most often.
        self._weights = {
            name: [1.0 / (rank + 1) ** 0.8 for rank in range(len(ids))]
            for name, ids in self.by_category.items()
        }
        self.user_ids = [f"user-{u:05d}" for u in range(self.users)]
        self.group_of = {user: u % self.groups for u, user in enumerate(self.user_ids)}
        # Distinct starting tastes per group; every drift rotates all of them by a non-zero offset.
        self._base = self._rng.sample(range(self.categories), self.groups)
        self._offset = 0

    def taste(self, group: int) -> str:
        """The category a group prefers now."""
        return self.category_names[(self._base[group] + self._offset) % self.categories]

    def taste_of(self, user_id: str) -> str:
        return self.taste(self.group_of[user_id])

    def drift(self) -> None:
        """Every group moves to another category (groups keep distinct tastes)."""
        self.phase += 1
        if self.categories > 1:
            self._offset += self._rng.randint(1, self.categories - 1)

    def next_event(self) -> SyntheticEvent:
        user = self._rng.choice(self.user_ids)
        if self._rng.random() < self.affinity:
            category = self.taste_of(user)
            item = self._rng.choices(self.by_category[category], weights=self._weights[category])[0]
        else:
            item = self._rng.choice(self.catalogue).item_id
        kind = "purchase" if self._rng.random() < self.purchase_share else "click"
        return SyntheticEvent(user, item, kind)

    def events(self, n: int) -> list[SyntheticEvent]:
        return [self.next_event() for _ in range(n)]

    def category_of(self, item_id: str) -> str | None:
        try:
            index = int(item_id.removeprefix("item-"))
        except ValueError:
            return None
        return self.catalogue[index].category if 0 <= index < len(self.catalogue) else None

    def sample_users(self, n: int) -> list[str]:
        return self._rng.sample(self.user_ids, min(n, len(self.user_ids)))
