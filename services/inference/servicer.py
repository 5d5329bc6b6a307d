"""The gRPC face of inference: ``freshrec.v1.InferenceService``.

A request reads the serving state once (model, index, catalogue view) and finishes on it. Its
only network hop is the user lookup in the feature service (shared with concurrent requests);
then one onnxruntime call computes the user vector from the user's latest events (also shared,
in a worker thread: ``batcher.py``), and numpy does the rest.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from freshrec.v1 import inference_pb2, inference_pb2_grpc, watermark_pb2
from services.inference.batcher import UserTowerBatcher
from services.inference.features import FeatureClient, PopularCache, UserView
from services.inference.index import ServingState, top_k
from services.inference.ranking import (
    choose_exploration,
    exploration_reason,
    exploration_slots,
    interleave,
    mmr,
    model_reasons,
)
from services.inference.reloader import ModelHolder
from shared.settings import RequestLimits
from shared.watermark import watermark_proto

DEFAULT_K = 10
MODEL = inference_pb2.RECOMMENDATION_SOURCE_MODEL
POPULAR = inference_pb2.RECOMMENDATION_SOURCE_POPULAR
COLD_START = inference_pb2.RECOMMENDATION_SOURCE_COLD_START
FOLLOW_UP = inference_pb2.RECOMMENDATION_SOURCE_FOLLOW_UP
EXPLORATION = inference_pb2.RECOMMENDATION_SOURCE_EXPLORATION


@dataclass(frozen=True)
class RankingSettings:
    """Request-path knobs the servicer needs from the service settings."""

    exact_limit: int
    mmr_candidates: int
    exploration_sample: int


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        holder: ModelHolder,
        features: FeatureClient,
        popular: PopularCache,
        ranking: RankingSettings,
        seed: int | None = None,
        limits: RequestLimits | None = None,
        tower: UserTowerBatcher | None = None,
    ) -> None:
        self.limits = limits or RequestLimits()
        self.tower = tower or UserTowerBatcher()
        self.holder = holder
        self.features = features
        self.popular = popular
        self.ranking = ranking
        self.rng = np.random.default_rng(seed)

    # -- validation ------------------------------------------------------------------------------
    @staticmethod
    def _freshness(state: ServingState | None) -> tuple[str, watermark_pb2.Watermark]:
        if state is None:
            return "", watermark_proto(0, 0.0)
        sequence, event_time = state.model.trained_through
        return state.model.version, watermark_proto(sequence, event_time)

    async def _check_id(self, value: str, name: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not value:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is empty")
        if len(value) > self.limits.max_id_length:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{name} is longer than {self.limits.max_id_length}"
            )

    async def _check_k(self, k: int, context: grpc.aio.ServicerContext[Any, Any]) -> int:
        if k > self.limits.max_k:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"k is {k}; at most {self.limits.max_k} items per call"
            )
        return k or DEFAULT_K

    async def _check_list(
        self, values: list[str], name: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        most = self.limits.max_ids_per_request
        if len(values) > most:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{name} has {len(values)} ids; at most {most}"
            )
        for value in values:
            await self._check_id(value, f"an entry of {name}", context)

    @staticmethod
    async def _check_share(value: float, name: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is {value}; it must be in [0, 1]")

    async def _validate_recommend(
        self, request: inference_pb2.RecommendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> int:
        await self._check_id(request.user_id, "user_id", context)
        k = await self._check_k(request.k, context)
        await self._check_list(list(request.exclude_item_ids), "exclude_item_ids", context)
        if len(request.categories) > self.limits.max_ids_per_request:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {self.limits.max_ids_per_request} categories"
            )
        for category in request.categories:
            await self._check_id(category, "a category", context)
        await self._check_share(request.diversity, "diversity", context)
        await self._check_share(request.exploration, "exploration", context)
        limits = self.limits
        if len(request.context) > limits.max_context_entries:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {limits.max_context_entries} context entries"
            )
        for key, value in request.context.items():
            if not key or len(key) > limits.max_id_length or len(value) > limits.max_id_length:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"context keys must have 1 to {limits.max_id_length} characters, "
                    f"values at most {limits.max_id_length}",
                )
        return k

    # -- Recommend -------------------------------------------------------------------------------
    async def Recommend(
        self, request: inference_pb2.RecommendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.RecommendResponse:
        k = await self._validate_recommend(request, context)
        state = self.holder.state  # read once: this request finishes on this model
        user = await self.features.user(request.user_id)
        version, trained_through = self._freshness(state)
        response = inference_pb2.RecommendResponse(model_version=version, trained_through=trained_through)
        excluded = set(request.exclude_item_ids)
        if not request.include_seen:
            excluded.update(user.seen)
        categories = list(request.categories)

        if state is None:
            await self._popular_into(response, request, categories, excluded, k, POPULAR, context)
            return response
        model = state.model
        personal = request.user_id in model.user_rows or any(i in model.item_rows for i in user.recent_items)
        allowed = state.allowed(categories)
        # The version's policy picks the ranker for users with this much history (``serving`` in
        # its manifest); a version without one answers newcomers from the feature service's lists.
        ranker = model.ranker_for(len(user.seen))
        if ranker != "model":
            self._fallback_into(response, state, ranker, user, k, excluded, allowed)
            return response
        # With an exact catalogue, the batch also scores every item off the loop (one product).
        exact = personal and allowed is None and model.ann is None
        found = await self.tower.vector(
            state, user.recent if personal else [], request.user_id, dict(request.context), score_all=exact
        )
        vector = found.vector
        banned = state.positions(excluded)
        n_explore = exploration_slots(k, request.exploration)

        if not personal:
            taken = np.zeros(0, dtype=np.int64)
            if not model.policy:  # a version without a policy: the feature service's lists first
                await self._popular_into(
                    response, request, categories, excluded, k - n_explore, COLD_START, context
                )
                taken = state.positions([i.item_id for i in response.items])
            missing = k - n_explore - len(response.items)
            if missing > 0:  # the model's view of a newcomer: chosen by the policy, or filling in
                fill, fill_scores = self._retrieve(
                    state, vector, missing, np.concatenate([banned, taken]), allowed, categories
                )
                for position, score in zip(fill, fill_scores, strict=True):
                    response.items.add(
                        item_id=state.item_id(int(position)),
                        score=float(score),
                        reason=f"suggested for newcomers by model {model.version}",
                        source=COLD_START,
                    )
                taken = np.concatenate([taken, fill])
            explore = choose_exploration(
                state,
                vector,
                k - len(response.items),
                np.concatenate([banned, taken]),
                allowed,
                self.rng,
                self.ranking.exploration_sample,
            )
            self._add_exploration(response, state, explore, vector)
            state.record_impressions(state.positions([i.item_id for i in response.items]))
            return response

        if request.diversity > 0:
            pool = max(self.ranking.mmr_candidates, 2 * k)
            candidates, scores = self._retrieve(
                state, vector, pool, banned, allowed, categories, found.scores
            )
            order = mmr(scores, state.unit_embeddings(candidates), k, request.diversity)
            main, main_scores = candidates[order], scores[order]
        else:
            main, main_scores = self._retrieve(state, vector, k, banned, allowed, categories, found.scores)
        explore = choose_exploration(
            state,
            vector,
            n_explore,
            np.concatenate([banned, main[: k - n_explore]]),
            allowed,
            self.rng,
            self.ranking.exploration_sample,
        )
        merged = interleave(list(range(len(main))), list(range(len(explore))), k)
        explore_scores = state.score_positions(explore, vector)
        main_reasons = model_reasons(state, main, user.recent)
        now = time.time()
        shown: list[int] = []
        for index, is_exploration in merged:
            if is_exploration:
                position = int(explore[index])
                response.items.add(
                    item_id=state.item_id(position),
                    score=float(explore_scores[index]),
                    reason=exploration_reason(state, position, now),
                    source=EXPLORATION,
                )
            else:
                position = int(main[index])
                response.items.add(
                    item_id=state.item_id(position),
                    score=float(main_scores[index]),
                    reason=main_reasons[index],
                    source=MODEL,
                )
            shown.append(position)
        state.record_impressions(np.array(shown, dtype=np.int64))
        return response

    def _fallback_into(
        self,
        response: inference_pb2.RecommendResponse,
        state: ServingState,
        ranker: str,
        user: UserView,
        k: int,
        excluded: set[str],
        allowed: np.ndarray | None,
    ) -> None:
        """Items by one of the model's popularity columns (``popular:<half-life in events>``), or
        what most often came right after the user's last item (``follow-up``)."""
        model = state.model
        after, last = 0, ""
        if ranker == "follow-up":
            column = model.popularity_columns.index(model.follow_up_backoff)
            for item_id, _ in reversed(user.recent):  # the newest item the model knows
                after = model.item_rows.get(item_id, 0)
                if after:
                    last = item_id
                    break
        else:
            column = model.popularity_columns.index(ranker)
        positions, scores = state.popular(column, k, state.positions(excluded), allowed, after)
        follow_ups = model.follow_ups[0][after] if after and model.follow_ups is not None else ()
        half_life = (model.follow_up_backoff if ranker == "follow-up" else ranker).partition(":")[2]
        for position, score in zip(positions, scores, strict=True):
            if after and int(position) in follow_ups:
                reason, source = f"often taken right after “{state.title(last)}”", FOLLOW_UP
            else:
                reason, source = f"popular over the last {half_life} events", POPULAR
            response.items.add(
                item_id=state.item_id(int(position)), score=float(score), reason=reason, source=source
            )
        state.record_impressions(positions)

    def _retrieve(
        self,
        state: ServingState,
        vector: np.ndarray,
        k: int,
        banned: np.ndarray,
        allowed: np.ndarray | None,
        categories: list[str],
        scores_of_all: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        return state.retrieve(vector, k, banned, allowed, categories, self.ranking.exact_limit, scores_of_all)

    @staticmethod
    def _add_exploration(
        response: inference_pb2.RecommendResponse,
        state: ServingState,
        positions: np.ndarray,
        vector: np.ndarray,
    ) -> None:
        if not len(positions):
            return
        now = time.time()
        for position, score in zip(positions, state.score_positions(positions, vector), strict=True):
            response.items.add(
                item_id=state.item_id(int(position)),
                score=float(score),
                reason=exploration_reason(state, int(position), now),
                source=EXPLORATION,
            )

    async def _popular_into(
        self,
        response: inference_pb2.RecommendResponse,
        request: inference_pb2.RecommendRequest,
        categories: list[str],
        excluded: set[str],
        k: int,
        source: int,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Popular/trending items (per requested category, or the context's ``category``)."""
        wanted = categories or [request.context.get("category", "")]
        lists = []
        for category in wanted:
            ranked = await self.popular.ranked(category)
            if ranked is not None:
                lists.append(ranked)
        if not lists:
            if self.holder.state is None:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "no model is loaded and the feature service cannot provide popular items; retry shortly",
                )
            return
        suffix = "" if source == COLD_START else " (no model loaded yet)"
        seen = set(excluded)
        depth = 0
        while len(response.items) < k and any(depth < len(entries) for entries in lists):
            for entries in lists:  # round-robin over the requested categories
                if depth < len(entries) and len(response.items) < k:
                    item_id, score, reason = entries[depth]
                    if item_id not in seen:
                        seen.add(item_id)
                        response.items.add(
                            item_id=item_id, score=score, reason=reason + suffix, source=source
                        )
            depth += 1

    # -- ScoreItems, SimilarItems, GetModelInfo --------------------------------------------------
    async def _require_state(self, context: grpc.aio.ServicerContext[Any, Any]) -> ServingState:
        state = self.holder.state
        if state is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "no model is loaded yet; retry once one is published"
            )
        assert state is not None
        return state

    async def _user_vector(self, state: ServingState, user_id: str, user: UserView) -> np.ndarray:
        model = state.model
        personal = user_id in model.user_rows or any(i in model.item_rows for i in user.recent_items)
        return (await self.tower.vector(state, user.recent if personal else [], user_id)).vector

    async def ScoreItems(
        self, request: inference_pb2.ScoreItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.ScoreItemsResponse:
        await self._check_id(request.user_id, "user_id", context)
        await self._check_list(list(request.item_ids), "item_ids", context)
        state = await self._require_state(context)
        user = await self.features.user(request.user_id)
        version, trained_through = self._freshness(state)
        vector = await self._user_vector(state, request.user_id, user)
        ids = list(request.item_ids)
        positions = np.array([state.position(i) for i in ids], dtype=np.int64)
        scores = state.score_positions(positions[positions > 0], vector)
        response = inference_pb2.ScoreItemsResponse(model_version=version, trained_through=trained_through)
        known = iter(scores)
        for item_id, position in zip(ids, positions, strict=True):
            if position:
                response.scores.add(item_id=item_id, score=float(next(known)))
            else:
                response.unknown_item_ids.append(item_id)
        return response

    async def SimilarItems(
        self, request: inference_pb2.SimilarItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.SimilarItemsResponse:
        await self._check_id(request.item_id, "item_id", context)
        k = await self._check_k(request.k, context)
        state = await self._require_state(context)
        position = state.position(request.item_id)
        if not position:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"item {request.item_id!r} is unknown to model {state.model.version} and the catalogue",
            )
        version, trained_through = self._freshness(state)
        anchor = state.unit_embeddings(np.array([position]))[0]
        banned = np.array([position], dtype=np.int64)
        if state.model.ann is None:
            candidates = np.arange(1, state.total)
        else:  # inner-product neighbours of the unit vector, re-ranked by cosine below
            candidates, _ = state.retrieve(anchor, max(4 * k, 100), banned)
        candidates = candidates[candidates != position]
        cosine = state.unit_embeddings(candidates) @ anchor
        best = top_k(cosine, k)
        mine = (
            set(state.catalogue[request.item_id].categories) if request.item_id in state.catalogue else set()
        )
        response = inference_pb2.SimilarItemsResponse(model_version=version, trained_through=trained_through)
        for index in best:
            other = int(candidates[index])
            other_id = state.item_id(other)
            entry = state.catalogue.get(other_id)
            shared = sorted(mine & set(entry.categories)) if entry else []
            reason = (
                f"close to “{state.title(request.item_id)}” in model {state.model.version}'s embedding space"
            )
            if shared:
                reason += f"; both in {', '.join(shared)}"
            response.items.add(
                item_id=other_id,
                score=float(cosine[index]),
                reason=reason,
                source=MODEL,
            )
        return response

    async def GetModelInfo(
        self, request: inference_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.GetModelInfoResponse:
        state = self.holder.state
        version, trained_through = self._freshness(state)
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
