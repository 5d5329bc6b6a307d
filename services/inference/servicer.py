"""The gRPC face of inference: ``freshrec.v1.InferenceService``.

Each RPC checks its request (``validation.py``), asks the policy for the answer (``policy.py``)
and turns a ``RequestError`` into the call's status and reason. ``Recommend`` and
``SimilarItems`` name each answer (``recommendation_id``) and hand it to the served-list
publisher (``served.py``), which publishes it off the request path.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from freshrec.v1 import inference_pb2, inference_pb2_grpc
from services.inference import validation
from services.inference.policy import Recommender, freshness
from services.inference.served import ServedPublisher, new_recommendation_id
from shared.settings import RequestLimits
from shared.validation import answers


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self, recommender: Recommender, limits: RequestLimits, served: ServedPublisher | None = None
    ) -> None:
        self.recommender = recommender
        self.holder = recommender.holder
        self.limits = limits
        self.served = served

    @answers
    async def Recommend(
        self, request: inference_pb2.RecommendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.RecommendResponse:
        k = validation.recommend(request, self.limits)
        response = await self.recommender.recommend(request, k)
        response.recommendation_id = new_recommendation_id()
        if self.served is not None:
            self.served.offer(request, response)
        return response

    @answers
    async def ScoreItems(
        self, request: inference_pb2.ScoreItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.ScoreItemsResponse:
        validation.score_items(request, self.limits)
        return await self.recommender.score_items(request)

    @answers
    async def SimilarItems(
        self, request: inference_pb2.SimilarItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.SimilarItemsResponse:
        k = validation.similar_items(request, self.limits)
        response = self.recommender.similar_items(request, k)
        response.recommendation_id = new_recommendation_id()
        if self.served is not None:
            self.served.offer(request, response)
        return response

    async def GetModelInfo(
        self, request: inference_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.GetModelInfoResponse:
        state = self.holder.state
        version, trained_through = freshness(state)
        response = inference_pb2.GetModelInfoResponse(
            model_version=version,
            trained_through=trained_through,
            loaded_versions=list(reversed(self.holder.loaded)),
        )
        if state is not None:
            response.manifest_json = json.dumps(state.model.manifest, sort_keys=True)
            response.loaded_at.FromNanoseconds(int(state.model.loaded_at * 1e9))
            response.catalogue_size = state.catalogue_size
        return response
