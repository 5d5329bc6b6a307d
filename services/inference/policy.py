"""How inference answers: which ranker serves a request, and the answer it builds.

A request reads the serving state once (model, index, catalogue view) and finishes on it. Its
only network hop is the user lookup in the feature service (shared with concurrent requests);
then one onnxruntime call computes the user vector from the user's latest events (also shared,
in a worker thread: ``batcher.py``), and numpy does the rest.

``Recommend`` takes one of four paths:

- **no model loaded**: the feature service's popular lists;
- **a fallback ranker**: the version's policy (``serving`` in its manifest, chosen by the trainer
  on recent traffic) names a popularity column or the follow-up table for users with this much
  history;
- **a newcomer** the model knows nothing of: the model's view of a user with no history (after the
  feature service's lists, for a version without a policy);
- **a known user**: the model's nearest items, re-ranked for diversity, with exploration slots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import numpy as np

from freshrec.v1 import inference_pb2, watermark_pb2
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
from shared.validation import RequestError
from shared.watermark import watermark_proto

MODEL = inference_pb2.RECOMMENDATION_SOURCE_MODEL
POPULAR = inference_pb2.RECOMMENDATION_SOURCE_POPULAR
COLD_START = inference_pb2.RECOMMENDATION_SOURCE_COLD_START
FOLLOW_UP = inference_pb2.RECOMMENDATION_SOURCE_FOLLOW_UP
EXPLORATION = inference_pb2.RECOMMENDATION_SOURCE_EXPLORATION


@dataclass(frozen=True)
class RankingSettings:
    """Request-path knobs the policy needs from the service settings."""

    exact_limit: int
    mmr_candidates: int
    exploration_sample: int


def freshness(state: ServingState | None) -> tuple[str, watermark_pb2.Watermark]:
    """The version that answers and what it was trained through (empty without a model)."""
    if state is None:
        return "", watermark_proto(0, 0.0)
    sequence, event_time = state.model.trained_through
    return state.model.version, watermark_proto(sequence, event_time)


def _knows(state: ServingState, user_id: str, user: UserView) -> bool:
    """Whether the model can personalise: it has the user's row or one of their recent items."""
    model = state.model
    return user_id in model.user_rows or any(i in model.item_rows for i in user.recent_items)


class Recommender:
    """Answers ``Recommend``, ``ScoreItems`` and ``SimilarItems`` on the serving state."""

    def __init__(
        self,
        holder: ModelHolder,
        features: FeatureClient,
        popular: PopularCache,
        ranking: RankingSettings,
        tower: UserTowerBatcher,
        rng: np.random.Generator,
    ) -> None:
        self.holder = holder
        self.features = features
        self.popular = popular
        self.ranking = ranking
        self.tower = tower
        self.rng = rng

    # -- Recommend -------------------------------------------------------------------------------
    async def recommend(
        self, request: inference_pb2.RecommendRequest, k: int
    ) -> inference_pb2.RecommendResponse:
        state = self.holder.state  # read once: this request finishes on this model
        user = await self.features.user(request.user_id)
        version, trained_through = freshness(state)
        response = inference_pb2.RecommendResponse(model_version=version, trained_through=trained_through)
        excluded = set(request.exclude_item_ids)
        if not request.include_seen:
            excluded.update(user.seen)
        categories = list(request.categories)

        if state is None:
            await self._popular_into(response, request, categories, excluded, k, POPULAR)
            return response
        allowed = state.allowed(categories)
        # The version's policy picks the ranker for users with this much history (``serving`` in
        # its manifest); a version without one answers newcomers from the feature service's lists.
        ranker = state.model.ranker_for(len(user.seen))
        if ranker != "model":
            self._fallback_into(response, state, ranker, user, k, excluded, allowed)
        elif _knows(state, request.user_id, user):
            await self._personal_into(response, request, state, user, k, excluded, allowed)
        else:
            await self._newcomer_into(response, request, state, k, excluded, allowed)
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
        positions, scores = state.popular(column, k, state.banned(excluded, time.time()), allowed, after)
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

    async def _newcomer_into(
        self,
        response: inference_pb2.RecommendResponse,
        request: inference_pb2.RecommendRequest,
        state: ServingState,
        k: int,
        excluded: set[str],
        allowed: np.ndarray | None,
    ) -> None:
        """The model's view of a user with no history it knows, then exploration slots."""
        model = state.model
        categories = list(request.categories)
        found = await self.tower.vector(state, [], request.user_id, dict(request.context))
        vector = found.vector
        banned = state.banned(excluded, time.time())
        n_explore = exploration_slots(k, request.exploration)
        taken = np.zeros(0, dtype=np.int64)
        if not model.policy:  # a version without a policy: the feature service's lists first
            await self._popular_into(response, request, categories, excluded, k - n_explore, COLD_START)
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

    async def _personal_into(
        self,
        response: inference_pb2.RecommendResponse,
        request: inference_pb2.RecommendRequest,
        state: ServingState,
        user: UserView,
        k: int,
        excluded: set[str],
        allowed: np.ndarray | None,
    ) -> None:
        """The model's nearest items for a user it knows, MMR-diversified, exploration interleaved."""
        categories = list(request.categories)
        # With an exact catalogue, the batch also scores every item off the loop (one product).
        exact = allowed is None and state.model.ann is None
        found = await self.tower.vector(
            state, user.recent, request.user_id, dict(request.context), score_all=exact
        )
        vector = found.vector
        banned = state.banned(excluded, time.time())
        n_explore = exploration_slots(k, request.exploration)
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
                raise RequestError(
                    "no model is loaded and the feature service cannot provide popular items; retry shortly",
                    grpc.StatusCode.UNAVAILABLE,
                )
            return
        suffix = "" if source == COLD_START else " (no model loaded yet)"
        seen = set(excluded)
        catalogue, now = self.holder.catalogue, time.time()
        depth = 0
        while len(response.items) < k and any(depth < len(entries) for entries in lists):
            for entries in lists:  # round-robin over the requested categories
                if depth < len(entries) and len(response.items) < k:
                    item_id, score, reason = entries[depth]
                    if item_id not in seen and catalogue.servable(item_id, now):
                        seen.add(item_id)
                        response.items.add(
                            item_id=item_id, score=score, reason=reason + suffix, source=source
                        )
            depth += 1

    # -- ScoreItems, SimilarItems ----------------------------------------------------------------
    def _require_state(self) -> ServingState:
        state = self.holder.state
        if state is None:
            raise RequestError(
                "no model is loaded yet; retry once one is published", grpc.StatusCode.UNAVAILABLE
            )
        return state

    async def score_items(self, request: inference_pb2.ScoreItemsRequest) -> inference_pb2.ScoreItemsResponse:
        state = self._require_state()
        user = await self.features.user(request.user_id)
        version, trained_through = freshness(state)
        recent = user.recent if _knows(state, request.user_id, user) else []
        vector = (await self.tower.vector(state, recent, request.user_id)).vector
        ids = list(request.item_ids)
        positions = np.array([state.position(i) for i in ids], dtype=np.int64)
        # Hidden, expired or deleted items are not scored: they are named as unavailable.
        unavailable = np.isin(positions, state.unservable(time.time())) & (positions > 0)
        scores = state.score_positions(positions[(positions > 0) & ~unavailable], vector)
        response = inference_pb2.ScoreItemsResponse(model_version=version, trained_through=trained_through)
        known = iter(scores)
        for item_id, position, withheld in zip(ids, positions, unavailable, strict=True):
            if withheld:
                response.unavailable_item_ids.append(item_id)
            elif position:
                response.scores.add(item_id=item_id, score=float(next(known)))
            else:
                response.unknown_item_ids.append(item_id)
        return response

    def similar_items(
        self, request: inference_pb2.SimilarItemsRequest, k: int
    ) -> inference_pb2.SimilarItemsResponse:
        state = self._require_state()
        position = state.position(request.item_id)
        if not position:
            raise RequestError(
                f"item {request.item_id!r} is unknown to model {state.model.version} and the catalogue",
                grpc.StatusCode.NOT_FOUND,
            )
        unservable = state.unservable(time.time())
        if np.any(unservable == position):
            raise RequestError(
                f"item {request.item_id!r} is hidden, past its available_until or deleted",
                grpc.StatusCode.NOT_FOUND,
            )
        version, trained_through = freshness(state)
        anchor = state.unit_embeddings(np.array([position]))[0]
        banned = np.concatenate([[position], unservable]).astype(np.int64)
        if state.model.ann is None:
            candidates = np.arange(1, state.total)
        else:  # inner-product neighbours of the unit vector, re-ranked by cosine below
            candidates, _ = state.retrieve(anchor, max(4 * k, 100), banned)
        candidates = candidates[~np.isin(candidates, banned)]
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
            response.items.add(item_id=other_id, score=float(cosine[index]), reason=reason, source=MODEL)
        return response
