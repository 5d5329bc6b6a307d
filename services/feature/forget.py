"""The feature service's share of forgetting a user: their state in memory and their SQL row.

A replica first catches up with ``FRESHREC_EVENTS`` (its durable consumer has nothing pending from
before the request), so no event of the user it has not applied yet is applied after the forget;
events still on their way (accepted just before the tombstone, erased from the stream by
ingestion) are skipped for a while. The user's row goes at the next commit; the replica reports
done once SQL no longer has it and (SQLite) the file is vacuumed and its write-ahead log truncated.
"""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext
from sqlalchemy import Engine

from freshrec.v1 import ingestion_pb2
from services.feature import metrics
from services.feature.consumer import FeatureConsumer
from services.feature.store import FeatureStore
from shared.db import scrub_wal
from shared.nats import EVENTS_STREAM

logger = logging.getLogger(__name__)

#: How long a forget waits for the commit that deletes the row before trying again later.
COMMIT_WAIT_S = 10.0


class FeatureForget:
    def __init__(
        self,
        js: JetStreamContext,
        consumer: FeatureConsumer,
        store: FeatureStore,
        engine: Engine,
        durable: str,
    ) -> None:
        self.js = js
        self.consumer = consumer
        self.store = store
        self.engine = engine
        self.durable = durable  # the replica's consumer on FRESHREC_EVENTS

    async def caught_up(self) -> bool:
        last = int((await self.js.stream_info(EVENTS_STREAM)).state.last_seq or 0)
        info = await self.js.consumer_info(EVENTS_STREAM, self.durable)
        delivered = info.delivered.stream_seq if info.delivered else 0
        return bool(info.num_pending == 0 or (delivered or 0) >= last)

    async def __call__(self, task: ingestion_pb2.ForgetTask) -> str | None:
        user_id = task.user_id
        if not await self.caught_up():
            return None  # events from before the request are still to come: forget after them
        self.consumer.forgotten.add(user_id)
        held = self.consumer.state.forget_user(user_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMMIT_WAIT_S
        while await asyncio.to_thread(self.store.holds_user, user_id):
            if loop.time() > deadline:
                return None
            self.consumer.state.forget_user(user_id)  # a late event may have brought them back
            await asyncio.sleep(0.1)
        for attempt in range(50):
            if await asyncio.to_thread(scrub_wal, self.engine, vacuum=attempt == 0):
                break
            await asyncio.sleep(0.1)
        else:
            return None
        metrics.USERS_FORGOTTEN.labels(held=str(held).lower()).inc()
        return f"user {'held' if held else 'not held'}; state and row erased"
