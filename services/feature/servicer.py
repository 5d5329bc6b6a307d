"""The gRPC face of the feature service: ``freshrec.v1.FeatureService``."""

from __future__ import annotations

import asyncio

import grpc

from freshrec.v1 import feature_pb2, feature_pb2_grpc
from services.feature.state import FeatureState
from services.feature.store import FeatureStore
from shared.watermark import watermark_proto

MAX_K = 1000
MAX_ITEMS_PER_CALL = 1000
DEFAULT_PAGE = 500
MAX_ID_LENGTH = 128


class FeatureServicer(feature_pb2_grpc.FeatureServiceServicer):
    def __init__(self, state: FeatureState, store: FeatureStore) -> None:
        self.state = state
        self.store = store

    def _watermark(self):  # type: ignore[no-untyped-def]
        wm = self.state.watermark
        return watermark_proto(wm.stream_sequence, wm.event_time)

    async def GetUserFeatures(
        self, request: feature_pb2.GetUserFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> feature_pb2.GetUserFeaturesResponse:
        if not request.user_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id is empty")
        features = feature_pb2.UserFeatures(user_id=request.user_id)
        user = self.state.users.get(request.user_id)
        if user is not None:
            features.known = True
            limit = request.max_recent or self.state.max_recent
            for interaction in list(reversed(user.recent))[:limit]:
                entry = features.recent.add(
                    item_id=interaction.item_id, type=interaction.type, weight=interaction.weight
                )
                entry.occurred_at.FromNanoseconds(int(interaction.occurred_at * 1e9))
            features.event_counts.update(user.counts)
            features.last_event_at.FromNanoseconds(int(user.last_event_at * 1e9))
        return feature_pb2.GetUserFeaturesResponse(features=features, watermark=self._watermark())

    async def GetItemFeatures(
        self, request: feature_pb2.GetItemFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> feature_pb2.GetItemFeaturesResponse:
        if len(request.item_ids) > MAX_ITEMS_PER_CALL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_ITEMS_PER_CALL} item_ids per call"
            )
        response = feature_pb2.GetItemFeaturesResponse(watermark=self._watermark())
        for item_id in request.item_ids:
            entry = response.items.add(item_id=item_id)
            item = self.state.items.get(item_id)
            if item is not None:
                entry.known = True
                entry.popularity = item.popularity
                entry.event_counts.update(item.counts)
                entry.first_seen_at.FromNanoseconds(int(item.first_seen_at * 1e9))
                entry.last_seen_at.FromNanoseconds(int(item.last_seen_at * 1e9))
            elif item_id in self.state.item_categories:
                entry.known = True
        return response

    async def UpsertItems(
        self, request: feature_pb2.UpsertItemsRequest, context: grpc.aio.ServicerContext
    ) -> feature_pb2.UpsertItemsResponse:
        if len(request.items) > MAX_ITEMS_PER_CALL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_ITEMS_PER_CALL} items per call"
            )
        response = feature_pb2.UpsertItemsResponse()
        valid = []
        for index, item in enumerate(request.items):
            if not item.item_id:
                response.errors.add(index=index, item_id=item.item_id, reason="item_id is empty")
            elif len(item.item_id) > MAX_ID_LENGTH:
                response.errors.add(
                    index=index,
                    item_id=item.item_id[:MAX_ID_LENGTH],
                    reason=f"item_id longer than {MAX_ID_LENGTH}",
                )
            else:
                valid.append(item)
        if valid:
            await asyncio.to_thread(self.store.upsert_items, valid)
            for item in valid:
                self.state.item_categories[item.item_id] = list(item.categories)
        response.upserted = len(valid)
        return response

    async def GetItems(
        self, request: feature_pb2.GetItemsRequest, context: grpc.aio.ServicerContext
    ) -> feature_pb2.GetItemsResponse:
        if len(request.item_ids) > MAX_ITEMS_PER_CALL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_ITEMS_PER_CALL} item_ids per call"
            )
        found = await asyncio.to_thread(self.store.get_items, list(request.item_ids))
        response = feature_pb2.GetItemsResponse()
        for item_id in request.item_ids:
            if item_id in found:
                response.items.append(found[item_id])
            else:
                response.missing_item_ids.append(item_id)
        return response

    async def ListItems(
        self, request: feature_pb2.ListItemsRequest, context: grpc.aio.ServicerContext
    ) -> feature_pb2.ListItemsResponse:
        size = min(request.page_size or DEFAULT_PAGE, MAX_ITEMS_PER_CALL)
        items = await asyncio.to_thread(self.store.list_items, request.page_token, size + 1)
        response = feature_pb2.ListItemsResponse(items=items[:size])
        if len(items) > size:
            response.next_page_token = items[size - 1].item_id
        return response

    async def GetPopularItems(
        self, request: feature_pb2.GetPopularItemsRequest, context: grpc.aio.ServicerContext
    ) -> feature_pb2.GetPopularItemsResponse:
        if request.k > MAX_K:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k must be at most {MAX_K}")
        ranked = self.state.popular(request.k or 10, request.category)
        return feature_pb2.GetPopularItemsResponse(
            items=[feature_pb2.PopularItem(item_id=i, score=s) for i, s in ranked],
            watermark=self._watermark(),
        )
