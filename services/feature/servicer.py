"""The gRPC face of the feature service: ``freshrec.v1.FeatureService``.

Feature reads are served from memory and carry the watermark of the state they were read
from (stream sequence and event time of the last applied event, and the lag to now).
"""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from freshrec.v1 import feature_pb2, feature_pb2_grpc, watermark_pb2
from services.feature.catalog import Catalog
from services.feature.settings import FeatureSettings
from services.feature.state import FeatureState
from services.feature.store import FeatureStore
from shared.nats import user_partition
from shared.settings import RequestLimits
from shared.watermark import watermark_proto

DEFAULT_K = 10
DEFAULT_PAGE = 500


def _set_time(field: Timestamp, seconds: float) -> None:
    field.FromNanoseconds(int(round(seconds * 1e9)))


async def _invalid(context: grpc.aio.ServicerContext[Any, Any], reason: str) -> NoReturn:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
    raise AssertionError("unreachable")  # abort raises


async def _check_ids(
    context: grpc.aio.ServicerContext[Any, Any], ids: list[str], what: str, limits: RequestLimits
) -> None:
    if len(ids) > limits.max_ids_per_request:
        await _invalid(context, f"at most {limits.max_ids_per_request} {what} per call")
    for item_id in ids:
        if not item_id:
            await _invalid(context, f"{what} has an empty id")
        if len(item_id) > limits.max_id_length:
            await _invalid(context, f"{what} has an id longer than {limits.max_id_length}")


class FeatureServicer(feature_pb2_grpc.FeatureServiceServicer):
    def __init__(
        self, state: FeatureState, store: FeatureStore, catalog: Catalog, settings: FeatureSettings
    ) -> None:
        self.state = state
        self.store = store
        self.catalog = catalog
        self.settings = settings

    def _watermark(self) -> watermark_pb2.Watermark:
        wm = self.state.watermark
        return watermark_proto(wm.stream_sequence, wm.event_time)

    async def _check_owned(self, context: grpc.aio.ServicerContext[Any, Any], user_id: str) -> None:
        partition = self.settings.partition
        if not partition.owns_partition(user_partition(user_id)):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"user {user_id!r} is in partition {user_partition(user_id)}, owned by replica "
                f"{user_partition(user_id) % partition.replicas} of {partition.replicas}, "
                f"not this one ({partition.replica})",
            )

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
            item_id, kind, occurred_at, weight, normalized_rating = user.recent[-n]
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

    async def GetUserFeatures(
        self, request: feature_pb2.GetUserFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.GetUserFeaturesResponse:
        user_id = request.user_id
        if not user_id:
            await _invalid(context, "user_id is empty")
        if len(user_id) > self.settings.limits.max_id_length:
            await _invalid(context, f"user_id longer than {self.settings.limits.max_id_length}")
        await self._check_owned(context, user_id)
        features = feature_pb2.UserFeatures(user_id=user_id)
        self._features(user_id, request.max_recent, features, request.include_seen_items)
        return feature_pb2.GetUserFeaturesResponse(features=features, watermark=self._watermark())

    async def BatchGetUserFeatures(
        self, request: feature_pb2.BatchGetUserFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.BatchGetUserFeaturesResponse:
        user_ids = list(request.user_ids)
        if not user_ids:
            await _invalid(context, "user_ids is empty: name at least one user")
        await _check_ids(context, user_ids, "user_ids", self.settings.limits)
        for user_id in user_ids:
            await self._check_owned(context, user_id)
        response = feature_pb2.BatchGetUserFeaturesResponse(watermark=self._watermark())
        for user_id in user_ids:
            self._features(
                user_id,
                request.max_recent,
                response.features.add(user_id=user_id),
                request.include_seen_items,
            )
        return response

    async def GetItemFeatures(
        self, request: feature_pb2.GetItemFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.GetItemFeaturesResponse:
        await _check_ids(context, list(request.item_ids), "item_ids", self.settings.limits)
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

    async def UpsertItems(
        self, request: feature_pb2.UpsertItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.UpsertItemsResponse:
        limit = self.settings.catalog.max_items_per_request
        if len(request.items) > limit:
            await _invalid(context, f"at most {limit} items per call")
        try:
            upserted, errors = await self.catalog.upsert(list(request.items), "grpc")
        except Exception as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"the catalogue could not be stored: {type(exc).__name__}"
            )
        response = feature_pb2.UpsertItemsResponse(upserted=upserted)
        for error in errors:
            response.errors.add(index=error.index, item_id=error.item_id, reason=error.reason)
        return response

    async def GetItems(
        self, request: feature_pb2.GetItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.GetItemsResponse:
        await _check_ids(context, list(request.item_ids), "item_ids", self.settings.limits)
        found = await asyncio.to_thread(self.store.get_items, list(request.item_ids))
        response = feature_pb2.GetItemsResponse()
        for item_id in request.item_ids:
            if item_id in found:
                response.items.append(found[item_id])
            else:
                response.missing_item_ids.append(item_id)
        return response

    async def ListItems(
        self, request: feature_pb2.ListItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.ListItemsResponse:
        if request.page_size > self.settings.limits.max_ids_per_request:
            await _invalid(context, f"page_size must be at most {self.settings.limits.max_ids_per_request}")
        if len(request.page_token) > self.settings.limits.max_id_length:
            await _invalid(context, "page_token is not one this service issued")
        size = request.page_size or DEFAULT_PAGE
        items = await asyncio.to_thread(self.store.list_items, request.page_token, size + 1)
        response = feature_pb2.ListItemsResponse(items=items[:size])
        if len(items) > size:
            response.next_page_token = items[size - 1].item_id
        return response

    async def GetPopularItems(
        self, request: feature_pb2.GetPopularItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feature_pb2.GetPopularItemsResponse:
        if request.k > self.settings.limits.max_k:
            await _invalid(context, f"k must be at most {self.settings.limits.max_k}")
        if len(request.category) > self.settings.catalog.max_label_length:
            await _invalid(context, f"category longer than {self.settings.catalog.max_label_length}")
        if request.window not in feature_pb2.PopularityWindow.values():
            await _invalid(context, f"window {request.window} is not a known PopularityWindow")
        trending = request.window == feature_pb2.POPULARITY_WINDOW_TRENDING
        ranked = self.state.popular(request.k or DEFAULT_K, request.category, trending=trending)
        return feature_pb2.GetPopularItemsResponse(
            items=[feature_pb2.PopularItem(item_id=i, score=s) for i, s in ranked],
            watermark=self._watermark(),
        )
