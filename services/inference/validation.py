"""What inference accepts: every request's fields checked against ``RequestLimits``, in one place.

A check raises ``RequestError`` with the gRPC status and a reason a client can act on; the
servicer turns it into the call's status. The policy raises the same error for a request that is
valid but cannot be answered yet (no model and no popular list: ``UNAVAILABLE``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from freshrec.v1 import inference_pb2
from shared.settings import RequestLimits
from shared.validation import RequestError, check_id, check_ids, check_k


def check_share(value: float, name: str) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise RequestError(f"{name} is {value}; it must be in [0, 1]")


def check_context(context: Mapping[str, str], limits: RequestLimits) -> None:
    if len(context) > limits.max_context_entries:
        raise RequestError(f"at most {limits.max_context_entries} context entries")
    longest = limits.max_id_length
    for key, value in context.items():
        if not key or len(key) > longest or len(value) > longest:
            raise RequestError(f"context keys must have 1 to {longest} characters, values at most {longest}")


def recommend(request: inference_pb2.RecommendRequest, limits: RequestLimits) -> int:
    """Checks a ``RecommendRequest``; returns its k."""
    check_id(request.user_id, "user_id", limits)
    k = check_k(request.k, limits)
    check_ids(request.exclude_item_ids, "exclude_item_ids", limits)
    if len(request.categories) > limits.max_ids_per_request:
        raise RequestError(f"at most {limits.max_ids_per_request} categories")
    for category in request.categories:
        check_id(category, "a category", limits)
    check_share(request.diversity, "diversity")
    check_share(request.exploration, "exploration")
    check_context(request.context, limits)
    return k


def score_items(request: inference_pb2.ScoreItemsRequest, limits: RequestLimits) -> None:
    check_id(request.user_id, "user_id", limits)
    check_ids(request.item_ids, "item_ids", limits)


def similar_items(request: inference_pb2.SimilarItemsRequest, limits: RequestLimits) -> int:
    """Checks a ``SimilarItemsRequest``; returns its k."""
    check_id(request.item_id, "item_id", limits)
    return check_k(request.k, limits)
