"""The gRPC face of the feature service: ``freshrec.v1.FeatureService``.

Feature reads are served from memory and carry the watermark of the state they were read
from (stream sequence and event time of the last applied event, and the lag to now).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from freshrec.v1 import feature_pb2, feature_pb2_grpc, watermark_pb2
from services.feature import validation
from services.feature.catalogue import Catalogue
from services.feature.settings import FeatureSettings
from services.feature.state import FeatureState
from services.feature.store import FeatureStore
from shared.validation import RequestError, answers, check_ids
from shared.watermark import watermark_proto


def _set_time(field: Timestamp, seconds: float) -> None:
    field.FromNanoseconds(int(round(seconds * 1e9)))


class FeatureServicer(feature_pb2_grpc.FeatureServiceServicer):
    def __init__(
        self, state: FeatureState, store: FeatureStore, catalogue: Catalogue, settings: FeatureSettings
    ) -> None:
        self.state = state
        self.store = store
        self.catalogue = catalogue
        self.settings = settings

    def _watermark(self) -> watermark_pb2.Watermark:
        wm = self.state.watermark
        return watermark_proto(wm.stream_sequence, wm.event_time)

    def _features(
        self, user_id: str, max_recent: int, features: feature_pb2.UserFeatures, seen: bool = False
    ) -> None:
        """Fills ``features`` (user_id set) from memory; left as unknown for an unknown user."""
        state = self.state
        user = state.users.get(user_id)
        if user is None:
            return
        features.known = True
        limit = min(max_recent or state.max_recent, len(user.recent))
        recent = features.recent
        for n in range(1, limit + 1):
            item_id, kind, occurred_at, weight, normalized_rating, _ = user.recent[-n]
            entry = recent.add(item_id=item_id, type=kind, weight=weight)
            if normalized_rating is not None:
                entry.normalized_rating = normalized_rating
            _set_time(entry.occurred_at, occurred_at)
        if seen:
            features.seen_item_ids.extend(user.seen)
        features.event_counts.update(user.counts)
        _set_time(features.last_event_at, user.last_event_at)
        features.category_affinity.update(state.affinities(user))
        features.likely_bot = state.is_likely_bot(user_id)
        pre = state.preprocessor.users.get(user_id)
        if pre is not None:
            features.rating_count = pre.n_ratings
            features.rating_mean, features.rating_std = pre.rating_stats(state.preprocessor.settings)

    @answers
    async def GetUserFeatures(
        self, request: feature_pb2.GetUserFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.GetUserFeaturesResponse:
        validation.user_features(request, self.settings)
        user_id = request.user_id
        features = feature_pb2.UserFeatures(user_id=user_id)
        self._features(user_id, request.max_recent, features, request.include_seen_items)
        return feature_pb2.GetUserFeaturesResponse(features=features, watermark=self._watermark())

    @answers
    async def BatchGetUserFeatures(
        self, request: feature_pb2.BatchGetUserFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.BatchGetUserFeaturesResponse:
        validation.batch_user_features(request, self.settings)
        user_ids = list(request.user_ids)
        response = feature_pb2.BatchGetUserFeaturesResponse(watermark=self._watermark())
        for user_id in user_ids:
            self._features(
                user_id,
                request.max_recent,
                response.features.add(user_id=user_id),
                request.include_seen_items,
            )
        return response

    @answers
    async def GetItemFeatures(
        self, request: feature_pb2.GetItemFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.GetItemFeaturesResponse:
        check_ids(request.item_ids, "item_ids", self.settings.limits)
        state = self.state
        response = feature_pb2.GetItemFeaturesResponse(watermark=self._watermark())
        for item_id in request.item_ids:
            entry = response.items.add(item_id=item_id)
            item = state.items.get(item_id)
            if item is not None:
                entry.known = True
                entry.popularity = state.item_popularity(item)
                entry.trending = state.trending_window.score(item.trending)
                entry.event_counts.update(item.counts)
                _set_time(entry.first_seen_at, item.first_seen_at)
                _set_time(entry.last_seen_at, item.last_seen_at)
            elif item_id in state.item_categories:
                entry.known = True
        return response

    @answers
    async def UpsertItems(
        self, request: feature_pb2.UpsertItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.UpsertItemsResponse:
        validation.upsert_items(request, self.settings)
        try:
            upserted, errors = await self.catalogue.upsert(list(request.items), "grpc")
        except Exception as exc:
            raise RequestError(
                f"the catalogue could not be stored: {type(exc).__name__}; retry the batch",
                grpc.StatusCode.UNAVAILABLE,
            ) from exc
        response = feature_pb2.UpsertItemsResponse(upserted=upserted)
        for error in errors:
            response.errors.add(index=error.index, item_id=error.item_id, reason=error.reason)
        return response

    @answers
    async def DeleteItems(
        self, request: feature_pb2.DeleteItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.DeleteItemsResponse:
        validation.delete_items(request, self.settings)
        try:
            deleted, missing = await self.catalogue.delete(list(request.item_ids))
        except Exception as exc:
            raise RequestError(
                f"the catalogue could not be changed: {type(exc).__name__}; retry the call",
                grpc.StatusCode.UNAVAILABLE,
            ) from exc
        return feature_pb2.DeleteItemsResponse(deleted=deleted, missing_item_ids=missing)

    @answers
    async def GetItems(
        self, request: feature_pb2.GetItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.GetItemsResponse:
        check_ids(request.item_ids, "item_ids", self.settings.limits)
        found = await asyncio.to_thread(self.store.get_items, list(request.item_ids))
        response = feature_pb2.GetItemsResponse()
        for item_id in request.item_ids:
            if item_id in found:
                response.items.append(found[item_id])
            else:
                response.missing_item_ids.append(item_id)
        return response

    @answers
    async def ListItems(
        self, request: feature_pb2.ListItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.ListItemsResponse:
        size = validation.list_items(request, self.settings)
        items = await asyncio.to_thread(self.store.list_items, request.page_token, size + 1)
        response = feature_pb2.ListItemsResponse(items=items[:size])
        if len(items) > size:
            response.next_page_token = items[size - 1].item_id
        return response

    @answers
    async def GetPopularItems(
        self, request: feature_pb2.GetPopularItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.GetPopularItemsResponse:
        k = validation.popular_items(request, self.settings)
        trending = request.window == feature_pb2.POPULARITY_WINDOW_TRENDING
        ranked = self.state.popular(k, request.category, trending=trending)
        return feature_pb2.GetPopularItemsResponse(
            items=[feature_pb2.PopularItem(item_id=i, score=s) for i, s in ranked],
            watermark=self._watermark(),
        )
