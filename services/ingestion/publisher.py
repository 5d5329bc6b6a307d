"""Publishing committed events to JetStream, and the outbox relay for whatever is left behind."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from freshrec.v1 import event_pb2
from services.ingestion.store import EventLog, StoredEvent
from shared.nats import EVENTS_STREAM, MSG_ID_HEADER, accepted_subject

logger = logging.getLogger(__name__)


def subject_for(event_type: int, user_id: str) -> str:
    return accepted_subject(event_pb2.EventType.Name(event_type), user_id)


class Publisher:
    """Publishes committed events with ``Nats-Msg-Id`` and marks the acknowledged ones published."""

    def __init__(self, nc: NatsClient, js: JetStreamContext, log: EventLog, timeout_s: float) -> None:
        self.nc = nc
        self.js = js
        self.log = log
        self.timeout_s = timeout_s
        self.in_flight: set[int] = set()

    async def publish(self, events: list[StoredEvent]) -> int:
        """Publishes in log order, pipelining acks; returns how many JetStream acknowledged.

        Events that fail stay unpublished in the log; the relay retries them. JetStream drops a
        repeat of the same ``Nats-Msg-Id`` within its duplicate window, so a retry never doubles.
        """
        if not events or not self.nc.is_connected:
            return 0
        seqs = [e.seq for e in events]
        self.in_flight.update(seqs)
        try:
            futures = []
            for e in events:
                futures.append(
                    await self.js.publish_async(
                        subject_for(e.type, e.user_id),
                        e.payload,
                        headers={MSG_ID_HEADER: e.event_id},
                        stream=EVENTS_STREAM,
                    )
                )
            done, pending = await asyncio.wait(futures, timeout=self.timeout_s)
            for future in pending:
                future.cancel()
            acked = [e.seq for e, f in zip(events, futures, strict=True) if f in done and not f.exception()]
            if acked:
                await asyncio.to_thread(self.log.mark_published, acked)
            if len(acked) < len(events):
                logger.warning(
                    "%d of %d events not acknowledged by JetStream; the relay will retry",
                    len(events) - len(acked),
                    len(events),
                )
            return len(acked)
        except Exception as exc:
            logger.warning("publishing %d events failed (%s); the relay will retry", len(events), exc)
            return 0
        finally:
            self.in_flight.difference_update(seqs)

    async def relay(self, interval_s: float, batch: int = 1000) -> None:
        """Publishes committed-but-unpublished events, oldest first, forever."""
        while True:
            try:
                await self.relay_once(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("outbox relay pass failed")
            await asyncio.sleep(interval_s)

    async def relay_once(self, batch: int = 1000) -> int:
        """One pass over the outbox; returns the number of events published."""
        published = 0
        after = 0
        while self.nc.is_connected:
            pending = await asyncio.to_thread(self.log.unpublished, batch, after)
            if not pending:
                break
            after = pending[-1].seq
            todo = [e for e in pending if e.seq not in self.in_flight]
            n = await self.publish(todo)
            published += n
            if n < len(todo):
                break
        if published:
            logger.info("outbox relay published %d events", published)
        return published
