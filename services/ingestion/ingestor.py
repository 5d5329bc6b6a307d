"""The one ingestion path that gRPC calls and NATS messages share: validate, dedup, commit, publish."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from freshrec.v1 import event_pb2, ingestion_pb2
from services.ingestion.publisher import Publisher
from services.ingestion.store import EventLog
from services.ingestion.validation import derive_event_id, validate_event

logger = logging.getLogger(__name__)


@dataclass
class Summary:
    """What happened to a batch: the same shape as the RPC responses."""

    accepted: int = 0
    duplicates: int = 0
    errors: list[ingestion_pb2.EventError] = field(default_factory=list)


class Ingestor:
    """Validates events, stores the new ones in the event log, then publishes them."""

    def __init__(self, log: EventLog, publisher: Publisher) -> None:
        self.log = log
        self.publisher = publisher

    async def ingest(self, events: list[event_pb2.Event], first_index: int = 0) -> Summary:
        summary = Summary()
        valid: list[event_pb2.Event] = []
        for offset, event in enumerate(events):
            reason = validate_event(event)
            if reason is None and not event.event_id:
                event.event_id = derive_event_id(event)
            if reason is not None:
                logger.debug("rejected event: %s", reason, extra={"event_id": event.event_id})
                summary.errors.append(
                    ingestion_pb2.EventError(
                        index=first_index + offset, event_id=event.event_id, reason=reason
                    )
                )
            else:
                valid.append(event)
        stored, duplicates = await asyncio.to_thread(self.log.insert_new, valid)
        summary.accepted = len(stored)
        summary.duplicates = duplicates
        # Committed: the event is durable. Publish now; anything not acknowledged is the relay's.
        await self.publisher.publish(stored)
        return summary
