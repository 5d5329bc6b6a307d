"""The inference replica's share of forgetting a user: cached features and models in memory.

The replica drops the user's cached features and every model it keeps loaded for an instant
rollback whose user table names the user, and erases the lists served to them from
``FRESHREC_SERVED``. It reports done once the model it serves, and the
version the store's LIVE pointer names (what it would load next), no longer name the user (the
trainer has made a version without them live), and the feature service has reported its part
done and no longer knows them (so no lookup can bring them back into the cache). Until then,
and for a while after, features of the user are neither cached nor used.
"""

from __future__ import annotations

import asyncio
import json
import logging

from nats.aio.client import Client as NatsClient

from freshrec.v1 import ingestion_pb2
from services.inference.features import FeatureClient
from services.inference.reloader import ModelHolder
from services.inference.served import erase_users_lists
from shared.forget import reported

logger = logging.getLogger(__name__)


def live_holds(holder: ModelHolder, user_id: str) -> bool:
    """Whether the version the store's LIVE pointer names has the user in its user table."""
    live = holder.store.live_version()
    if not live:
        return False
    try:
        users = json.loads((holder.store.versions_dir / live / "user_ids.json").read_text())
    except FileNotFoundError:
        return False  # withdrawn, or being replaced: the next check sees the new one
    except (OSError, ValueError):
        return True
    return user_id in users


class InferenceForget:
    def __init__(self, nc: NatsClient, holder: ModelHolder, features: FeatureClient) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.holder = holder
        self.features = features

    async def __call__(self, task: ingestion_pb2.ForgetTask) -> str | None:
        user_id = task.user_id
        holder = self.holder
        self.features.forgotten.add(user_id)
        if await asyncio.to_thread(live_holds, holder, user_id):
            return None  # the trainer has not made a version without the user live yet
        if not await holder.forget_user(user_id):
            await holder.sync_with_store()  # the announcement of the new version may have been missed
            if not await holder.forget_user(user_id):
                return None
        if not await reported(self.js, task.request_id, "feature"):
            return None  # the feature service may still hold the user (and hand them out again)
        if not await self.features.forget(user_id):
            return None  # it did not answer, or still knows them
        # Last, so that no answer made while the steps above waited is left on the stream.
        lists = await erase_users_lists(self.nc, user_id)
        served = holder.served_version or "no model"
        return f"serving {served}; cached features dropped; {lists} served lists erased"
