"""The inference replica's share of forgetting a user: cached features and models in memory.

The replica drops the user's cached features and every model it keeps loaded for an instant
rollback whose user table names the user; it reports done once the model it serves names them
no more (the trainer has made a version without them live) and the feature service no longer
knows them (so no lookup brings them back into the cache).
"""

from __future__ import annotations

import logging

from freshrec.v1 import ingestion_pb2
from services.inference.features import FeatureClient
from services.inference.reloader import ModelHolder

logger = logging.getLogger(__name__)


class InferenceForget:
    def __init__(self, holder: ModelHolder, features: FeatureClient) -> None:
        self.holder = holder
        self.features = features

    async def __call__(self, task: ingestion_pb2.ForgetTask) -> str | None:
        user_id = task.user_id
        holder = self.holder
        served = holder.served_version
        for version, model in list(holder.loaded.items()):
            if version != served and user_id in model.user_rows:
                holder.loaded.pop(version, None)
        current = holder.current
        if current is not None and user_id in current.user_rows:
            await holder.sync_with_store()  # the announcement of the new version may have been missed
            current = holder.current
            if current is not None and user_id in current.user_rows:
                return None  # the trainer has not made a version without the user live yet
        if not await self.features.forget(user_id):
            return None  # the feature service still has the user (or did not answer)
        return f"serving {holder.served_version or 'no model'}; cached features dropped"
