"""The feature service's durable consumer: apply events, commit with the position, then ack."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from freshrec.v1 import event_pb2
from services.feature.state import FeatureState
from services.feature.store import FeatureStore
from shared.nats import fetch_batch, pull_subscribe_events

logger = logging.getLogger(__name__)


class FeatureConsumer:
    def __init__(self, js: JetStreamContext, state: FeatureState, store: FeatureStore, name: str, batch: int):
        self.js = js
        self.state = state
        self.store = store
        self.name = name
        self.batch = batch

    async def run(self) -> None:
        psub = await pull_subscribe_events(self.js, self.name)
        try:
            while True:
                await self._step(psub)
        finally:
            # A pull subscription left open makes the connection's drain wait for its timeout.
            await psub.unsubscribe()

    async def _step(self, psub: JetStreamContext.PullSubscription) -> None:
        msgs = await fetch_batch(psub, self.batch, timeout_s=0.5)
        if msgs:
            await self.apply(msgs)

    async def apply(self, msgs: list[Msg]) -> None:
        """Applies, commits with the stream position, then acks (one ack covers the batch)."""
        users: set[str] = set()
        items: set[str] = set()
        for msg in msgs:
            event = event_pb2.Event()
            event.ParseFromString(msg.data)
            if self.state.apply(event, msg.metadata.sequence.stream):
                users.add(event.user_id)
                items.add(event.item_id)
        if users:
            try:
                await asyncio.to_thread(self.store.save, self.state, users, items)
            except Exception:
                # Memory got ahead of SQL: rebuild it from SQL and let JetStream redeliver.
                logger.exception("committing %d events failed; reloading state from SQL", len(msgs))
                await self._reload()
                return
        await msgs[-1].ack()

    async def _reload(self) -> None:
        fresh = FeatureState(self.state.max_recent, self.state.preprocessor.settings)
        await asyncio.to_thread(self.store.load, fresh)
        self.state.users, self.state.items = fresh.users, fresh.items
        self.state.item_categories, self.state.watermark = fresh.item_categories, fresh.watermark
