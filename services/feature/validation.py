"""What the feature service accepts: each read request checked against ``RequestLimits``.

A check raises ``RequestError`` (status and reason); the servicer sends it as the call's status.
A user lookup that reaches a replica not owning the user's partition is refused with
``FAILED_PRECONDITION`` and names the owner, so a client can route it.
"""

from __future__ import annotations

import grpc

from freshrec.v1 import feature_pb2
from services.feature.settings import FeatureSettings
from shared.nats import user_partition
from shared.validation import RequestError, check_id, check_ids, check_k

#: Catalogue entries in a ``ListItems`` page when the request leaves page_size at 0.
DEFAULT_PAGE = 500


def check_owned(user_id: str, settings: FeatureSettings) -> None:
    partition = settings.partition
    if not partition.owns_partition(user_partition(user_id)):
        raise RequestError(
            f"user {user_id!r} is in partition {user_partition(user_id)}, owned by replica "
            f"{user_partition(user_id) % partition.replicas} of {partition.replicas}, "
            f"not this one ({partition.replica})",
            grpc.StatusCode.FAILED_PRECONDITION,
        )


def user_features(request: feature_pb2.GetUserFeaturesRequest, settings: FeatureSettings) -> None:
    check_id(request.user_id, "user_id", settings.limits)
    check_owned(request.user_id, settings)


def batch_user_features(request: feature_pb2.BatchGetUserFeaturesRequest, settings: FeatureSettings) -> None:
    if not request.user_ids:
        raise RequestError("user_ids is empty: name at least one user")
    check_ids(request.user_ids, "user_ids", settings.limits)
    for user_id in request.user_ids:
        check_owned(user_id, settings)


def upsert_items(request: feature_pb2.UpsertItemsRequest, settings: FeatureSettings) -> None:
    """The batch's size; each entry is validated on its own by the catalogue."""
    limit = settings.catalogue.max_items_per_request
    if len(request.items) > limit:
        raise RequestError(f"UpsertItems takes at most {limit} items per call; split the batch")


def delete_items(request: feature_pb2.DeleteItemsRequest, settings: FeatureSettings) -> None:
    if not request.item_ids:
        raise RequestError("item_ids is empty: name at least one item to delete")
    check_ids(request.item_ids, "item_ids", settings.limits)


def list_items(request: feature_pb2.ListItemsRequest, settings: FeatureSettings) -> int:
    """Checks a ``ListItemsRequest``; returns its page size."""
    most = settings.limits.max_ids_per_request
    if request.page_size > most:
        raise RequestError(f"page_size must be at most {most}")
    if len(request.page_token) > settings.limits.max_id_length:
        raise RequestError("page_token is not one this service issued")
    return request.page_size or DEFAULT_PAGE


def popular_items(request: feature_pb2.GetPopularItemsRequest, settings: FeatureSettings) -> int:
    """Checks a ``GetPopularItemsRequest``; returns its k."""
    k = check_k(request.k, settings.limits)
    longest = settings.catalogue.max_label_length
    if len(request.category) > longest:
        raise RequestError(f"category is longer than {longest}")
    if request.window not in feature_pb2.PopularityWindow.values():
        raise RequestError(f"window {request.window} is not a known PopularityWindow")
    return k
