"""The gRPC face of inference: ``freshrec.v1.InferenceService``."""

from __future__ import annotations

import json

import grpc
import numpy as np

from freshrec.v1 import inference_pb2, inference_pb2_grpc
from services.inference.features import FeatureClient
from services.inference.model import LoadedModel
from services.inference.reloader import ModelHolder
from shared.watermark import watermark_proto

MAX_K = 1000
DEFAULT_K = 10
MAX_ID_LENGTH = 128
MODEL = inference_pb2.RECOMMENDATION_SOURCE_MODEL
POPULAR = inference_pb2.RECOMMENDATION_SOURCE_POPULAR
COLD_START = inference_pb2.RECOMMENDATION_SOURCE_COLD_START


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first (-inf scores never returned)."""
    k = min(k, int(np.isfinite(scores).sum()))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, holder: ModelHolder, features: FeatureClient) -> None:
        self.holder = holder
        self.features = features

    @staticmethod
    def _freshness(model: LoadedModel | None):  # type: ignore[no-untyped-def]
        if model is None:
            return "", watermark_proto(0, 0.0)
        sequence, event_time = model.trained_through
        return model.version, watermark_proto(sequence, event_time)

    async def _check_id(self, value: str, name: str, context: grpc.aio.ServicerContext) -> None:
        if not value:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is empty")
        if len(value) > MAX_ID_LENGTH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is longer than {MAX_ID_LENGTH}")

    async def _check_k(self, k: int, context: grpc.aio.ServicerContext) -> int:
        if k > MAX_K:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k is {k}; at most {MAX_K} items per call")
        return k or DEFAULT_K

    async def Recommend(
        self, request: inference_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.RecommendResponse:
        await self._check_id(request.user_id, "user_id", context)
        k = await self._check_k(request.k, context)
        if request.categories or request.diversity or request.exploration:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "categories, diversity and exploration are not supported yet; leave them unset",
            )
        model = self.holder.current  # read once: this request finishes on this model
        version, trained_through = self._freshness(model)
        user = await self.features.user(request.user_id)
        excluded = set(request.exclude_item_ids)
        if not request.include_seen:
            excluded.update(user.recent)
        response = inference_pb2.RecommendResponse(model_version=version, trained_through=trained_through)

        known_history = model is not None and any(i in model.item_rows for i in user.recent)
        if model is not None and (known_history or request.user_id in model.user_rows):
            vector = model.user_vectors([user.recent], [request.user_id])[0]
            scores = model.item_matrix @ vector
            scores[0] = -np.inf
            for item_id in excluded:
                row = model.item_rows.get(item_id)
                if row:
                    scores[row] = -np.inf
            reason = f"learned by model {model.version} from your {len(user.recent)} recent interactions"
            for row in top_k(scores, k):
                response.items.add(
                    item_id=model.item_ids[row], score=float(scores[row]), reason=reason, source=MODEL
                )
            return response

        source = COLD_START if model is not None else POPULAR
        reason = "popular right now" if model is not None else "popular right now (no model loaded yet)"
        for item_id, score in await self.features.popular(k + len(excluded)):
            if item_id not in excluded and len(response.items) < k:
                response.items.add(item_id=item_id, score=score, reason=reason, source=source)
        return response

    async def ScoreItems(
        self, request: inference_pb2.ScoreItemsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ScoreItemsResponse:
        await self._check_id(request.user_id, "user_id", context)
        if len(request.item_ids) > MAX_K:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_K} item_ids per call")
        model = self.holder.current
        if model is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "no model is loaded yet; retry once one is published"
            )
        assert model is not None
        version, trained_through = self._freshness(model)
        user = await self.features.user(request.user_id)
        vector = model.user_vectors([user.recent], [request.user_id])[0]
        response = inference_pb2.ScoreItemsResponse(model_version=version, trained_through=trained_through)
        for item_id in request.item_ids:
            row = model.item_rows.get(item_id)
            if row:
                response.scores.add(item_id=item_id, score=float(model.item_matrix[row] @ vector))
            else:
                response.unknown_item_ids.append(item_id)
        return response

    async def SimilarItems(
        self, request: inference_pb2.SimilarItemsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.SimilarItemsResponse:
        await self._check_id(request.item_id, "item_id", context)
        k = await self._check_k(request.k, context)
        model = self.holder.current
        if model is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "no model is loaded yet; retry once one is published"
            )
        assert model is not None
        row = model.item_rows.get(request.item_id)
        if not row:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"item {request.item_id!r} is unknown to model {model.version}"
            )
        version, trained_through = self._freshness(model)
        matrix = model.item_matrix
        norms = np.linalg.norm(matrix, axis=1) * (np.linalg.norm(matrix[row]) or 1.0)
        scores = (matrix @ matrix[row]) / np.where(norms > 0, norms, 1.0)
        scores[[0, row]] = -np.inf
        response = inference_pb2.SimilarItemsResponse(model_version=version, trained_through=trained_through)
        for other in top_k(scores, k):
            response.items.add(
                item_id=model.item_ids[other],
                score=float(scores[other]),
                reason=f"embedding closest to {request.item_id}",
                source=MODEL,
            )
        return response

    async def GetModelInfo(
        self, request: inference_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GetModelInfoResponse:
        model = self.holder.current
        version, trained_through = self._freshness(model)
        response = inference_pb2.GetModelInfoResponse(
            model_version=version,
            trained_through=trained_through,
            loaded_versions=list(reversed(self.holder.loaded)),
        )
        if model is not None:
            response.manifest_json = json.dumps(model.manifest, sort_keys=True)
            response.loaded_at.FromNanoseconds(int(model.loaded_at * 1e9))
            response.catalogue_size = len(model.item_ids) - 1
        return response
