"""The inference side of the feature service: user histories and popularity, with a deadline.

A user lookup that misses its deadline answers from the last value seen for that user, so a
slow feature service degrades freshness, never availability. Popularity lists are cached and
refreshed in the background, so the user lookup is the only network hop on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from freshrec.v1 import feature_pb2, feature_pb2_grpc

logger = logging.getLogger(__name__)

USER_LOOKUPS = Counter(
    "freshrec_inference_user_lookups_total", "User feature lookups by outcome.", ["outcome"]
)

TRENDING = feature_pb2.POPULARITY_WINDOW_TRENDING
ALL_TIME = feature_pb2.POPULARITY_WINDOW_ALL_TIME


@dataclass(frozen=True)
class UserView:
    """What a request needs to know about its user."""

    known: bool
    recent: list[tuple[str, int]]  # (item id, EventType), oldest first
    fresh: bool  # False when served from the cache after a failed lookup

    @property
    def recent_items(self) -> list[str]:
        return [item for item, _ in self.recent]


class FeatureClient:
    def __init__(self, channel: grpc.aio.Channel, deadline_s: float, cache_size: int = 100_000) -> None:
        self.stub = feature_pb2_grpc.FeatureServiceStub(channel)
        self.deadline_s = deadline_s
        self.cache: OrderedDict[str, UserView] = OrderedDict()
        self.cache_size = cache_size

    async def user(self, user_id: str) -> UserView:
        try:
            response = await self.stub.GetUserFeatures(
                feature_pb2.GetUserFeaturesRequest(user_id=user_id), timeout=self.deadline_s
            )
        except grpc.aio.AioRpcError as exc:
            cached = self.cache.get(user_id)
            USER_LOOKUPS.labels("cached" if cached is not None else "failed").inc()
            logger.debug(
                "feature lookup for %s failed (%s); cached=%s", user_id, exc.code(), cached is not None
            )
            if cached is not None:
                return UserView(cached.known, cached.recent, fresh=False)
            return UserView(known=False, recent=[], fresh=False)
        USER_LOOKUPS.labels("fresh").inc()
        features = response.features
        view = UserView(
            known=features.known,
            recent=[(i.item_id, int(i.type)) for i in reversed(features.recent)],
            fresh=True,
        )
        self.cache[user_id] = view
        self.cache.move_to_end(user_id)
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return view


@dataclass(frozen=True)
class PopularList:
    fetched_at: float
    items: list[tuple[str, float]]


class PopularCache:
    """Popular and trending items per category, fetched once and refreshed in the background."""

    def __init__(self, channel: grpc.aio.Channel, deadline_s: float, ttl_s: float, size: int = 1000) -> None:
        self.stub = feature_pb2_grpc.FeatureServiceStub(channel)
        self.deadline_s = deadline_s
        self.ttl_s = ttl_s
        self.size = size
        self.lists: dict[tuple[str, int], PopularList] = {}
        self.last_success = 0.0
        self._refreshing: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def available(self, within_s: float) -> bool:
        """True when the feature service answered a popularity request recently."""
        return time.monotonic() - self.last_success <= within_s

    async def fetch(self, category: str, window: int) -> PopularList | None:
        try:
            response = await self.stub.GetPopularItems(
                feature_pb2.GetPopularItemsRequest(
                    k=self.size,
                    category=category,
                    window=window,  # type: ignore[arg-type]
                ),
                timeout=self.deadline_s,
            )
        except grpc.aio.AioRpcError as exc:
            logger.debug("popular items (%r, %s) unavailable: %s", category, window, exc.code())
            return None
        self.last_success = time.monotonic()
        entry = PopularList(time.monotonic(), [(p.item_id, p.score) for p in response.items])
        self.lists[(category, window)] = entry
        return entry

    def _refresh_later(self, key: tuple[str, int]) -> None:
        if key in self._refreshing:
            return
        self._refreshing.add(key)

        async def refresh() -> None:
            try:
                await self.fetch(*key)
            finally:
                self._refreshing.discard(key)

        task = asyncio.create_task(refresh())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def get(self, category: str, window: int) -> list[tuple[str, float]] | None:
        """The cached list (refreshed behind the request when stale); None if never obtainable."""
        key = (category, window)
        entry = self.lists.get(key)
        if entry is None:
            entry = await self.fetch(category, window)
            return entry.items if entry is not None else None
        if time.monotonic() - entry.fetched_at > self.ttl_s:
            self._refresh_later(key)
        return entry.items

    async def ranked(self, category: str) -> list[tuple[str, float, str]] | None:
        """Trending items first, then all-time popular ones: (item id, score, reason)."""
        trending = await self.get(category, TRENDING)
        overall = await self.get(category, ALL_TIME)
        if trending is None and overall is None:
            return None
        where = f" in {category}" if category else ""
        out: list[tuple[str, float, str]] = []
        seen: set[str] = set()
        for items, reason in (
            (trending or [], f"trending{where} right now"),
            (overall or [], f"popular{where}"),
        ):
            for item_id, score in items:
                if item_id not in seen:
                    seen.add(item_id)
                    out.append((item_id, score, reason))
        return out
