"""The inference side of the feature service: user histories and popularity, with a deadline.

A lookup that misses its deadline answers from the last value seen for that user, so a slow
feature service degrades freshness, never availability.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import grpc

from freshrec.v1 import feature_pb2, feature_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UserView:
    """What a request needs to know about its user."""

    known: bool
    recent: list[str]  # item ids, oldest first
    fresh: bool  # False when served from the cache after a failed lookup


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
            logger.debug(
                "feature lookup for %s failed (%s); cached=%s", user_id, exc.code(), cached is not None
            )
            if cached is not None:
                return UserView(cached.known, cached.recent, fresh=False)
            return UserView(known=False, recent=[], fresh=False)
        features = response.features
        view = UserView(
            known=features.known, recent=[i.item_id for i in reversed(features.recent)], fresh=True
        )
        self.cache[user_id] = view
        self.cache.move_to_end(user_id)
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return view

    async def popular(self, k: int, category: str = "") -> list[tuple[str, float]]:
        """Popular items, best first; empty when the feature service cannot be reached."""
        try:
            response = await self.stub.GetPopularItems(
                feature_pb2.GetPopularItemsRequest(k=k, category=category), timeout=max(self.deadline_s, 0.2)
            )
        except grpc.aio.AioRpcError as exc:
            logger.warning("popular items unavailable: %s", exc.code())
            return []
        return [(p.item_id, p.score) for p in response.items]
