"""Inference's request checks, on their own: each limit refused with a reason that names it."""

from __future__ import annotations

import grpc
import pytest

from freshrec.v1 import inference_pb2
from services.inference import validation
from shared.settings import RequestLimits
from shared.validation import DEFAULT_K, RequestError

LIMITS = RequestLimits(max_id_length=8, max_ids_per_request=3, max_k=50, max_context_entries=2)


def refused(request: object) -> str:
    check = {
        inference_pb2.RecommendRequest: validation.recommend,
        inference_pb2.ScoreItemsRequest: validation.score_items,
        inference_pb2.SimilarItemsRequest: validation.similar_items,
    }[type(request)]
    with pytest.raises(RequestError) as caught:
        check(request, LIMITS)  # type: ignore[operator]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.reason


def test_a_valid_request_passes_and_k_defaults() -> None:
    assert validation.recommend(inference_pb2.RecommendRequest(user_id="u1"), LIMITS) == DEFAULT_K
    request = inference_pb2.RecommendRequest(
        user_id="u1", k=50, exclude_item_ids=["a", "b", "c"], diversity=1.0, exploration=0.0
    )
    request.context.update({"page": "home", "device": "tv"})
    assert validation.recommend(request, LIMITS) == 50
    assert validation.similar_items(inference_pb2.SimilarItemsRequest(item_id="i", k=3), LIMITS) == 3
    validation.score_items(inference_pb2.ScoreItemsRequest(user_id="u", item_ids=["a"]), LIMITS)


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (inference_pb2.RecommendRequest(), "user_id is empty"),
        (inference_pb2.RecommendRequest(user_id="u" * 9), "user_id is longer than 8"),
        (inference_pb2.RecommendRequest(user_id="u", k=51), "k is 51; at most 50"),
        (
            inference_pb2.RecommendRequest(user_id="u", exclude_item_ids=list("abcd")),
            "has 4 ids; at most 3 per call",
        ),
        (
            inference_pb2.RecommendRequest(user_id="u", exclude_item_ids=[""]),
            "exclude_item_ids has an empty id",
        ),
        (inference_pb2.RecommendRequest(user_id="u", categories=list("abcd")), "at most 3 categories"),
        (inference_pb2.RecommendRequest(user_id="u", diversity=1.5), "diversity is 1.5"),
        (inference_pb2.RecommendRequest(user_id="u", exploration=float("nan")), "exploration is nan"),
        (inference_pb2.ScoreItemsRequest(user_id="u", item_ids=["x" * 9]), "longer than 8"),
        (inference_pb2.SimilarItemsRequest(), "item_id is empty"),
        (inference_pb2.SimilarItemsRequest(item_id="i", k=1000), "k is 1000"),
    ],
)
def test_each_limit_is_refused_with_its_reason(request_: object, reason: str) -> None:
    assert reason in refused(request_)


def test_context_entries_are_bounded() -> None:
    request = inference_pb2.RecommendRequest(user_id="u")
    request.context.update({"a": "1", "b": "2", "c": "3"})
    assert "at most 2 context entries" in refused(request)
    request = inference_pb2.RecommendRequest(user_id="u")
    request.context.update({"a": "v" * 9})
    assert "values at most 8" in refused(request)
