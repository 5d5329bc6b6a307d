"""The one ingestion path that gRPC calls and NATS messages share: validate, dedup, commit, publish."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from freshrec.v1 import event_pb2, ingestion_pb2
from services.ingestion import metrics
from services.ingestion.publisher import Publisher
from services.ingestion.store import NewEvent
from services.ingestion.tombstones import Tombstones
from services.ingestion.validation import Rejection, Validator, derive_event_id
from services.ingestion.writer import GroupCommitter

logger = logging.getLogger(__name__)


@dataclass
class Summary:
    """What happened to a batch: the same shape as the RPC responses."""

    accepted: int = 0
    duplicates: int = 0
    errors: list[ingestion_pb2.EventError] = field(default_factory=list)
    #: The rule each error broke, parallel to ``errors`` (for metrics and dead-letter headers).
    rejections: list[Rejection] = field(default_factory=list)
    #: Events of forgotten users, dropped (a tombstone holds).
    forgotten: int = 0
    #: Their indexes in the batch (the NATS intake erases the raw messages that carried them).
    forgotten_indexes: list[int] = field(default_factory=list)


class Ingestor:
    """Validates events, stores the new ones in the event log (group commit), then publishes them.

    An event counts as accepted once it is committed to SQL; the call returns after JetStream has
    acknowledged it too, or after the publish timeout (the relay then publishes it), or at once
    while NATS is unreachable (the outbox keeps it until NATS is back).
    """

    def __init__(
        self,
        committer: GroupCommitter,
        publisher: Publisher,
        validator: Validator,
        owner: str,
        tombstones: Tombstones | None = None,
    ) -> None:
        self.committer = committer
        self.publisher = publisher
        self.validator = validator
        self.owner = owner
        self.tombstones = tombstones

    async def ingest(
        self,
        events: Sequence[event_pb2.Event],
        source: str,
        *,
        payloads: Sequence[bytes | None] | None = None,
        first_index: int = 0,
        calls: Sequence[int] | None = None,
    ) -> Summary:
        """Ingests a batch; ``payloads`` may carry each event's wire bytes, reused when unchanged.

        Events sent in one call (one RPC, one NATS message) share their receive time, which travels
        with them (``RECEIVED_HEADER``): consumers learn which events a producer sent together.
        ``calls`` numbers the producer calls of a batch that several of them were gathered into
        (NATS intake); each call's receive time is then one microsecond after the previous one's.
        """
        summary = Summary()
        rows: list[NewEvent] = []
        seen: set[str] = set()
        duplicates = 0
        check = self.validator.check
        now_s = time.time()
        received_us = int(now_s * 1e6)
        owner = self.owner
        tombstones = self.tombstones if self.tombstones is not None and self.tombstones.hashes else None
        for offset, event in enumerate(events):
            if tombstones is not None and tombstones.holds(event.user_id):
                # Dropped before validation: not even a dead letter keeps an event of theirs.
                summary.forgotten_indexes.append(offset)
                continue
            payload = payloads[offset] if payloads is not None else None
            if payload is None:
                payload = event.SerializeToString()
            rejection = check(event, now_s, len(payload))
            if rejection is not None:
                summary.errors.append(
                    ingestion_pb2.EventError(
                        index=first_index + offset,
                        event_id=event.event_id or derive_event_id(event),
                        reason=rejection.reason,
                    )
                )
                summary.rejections.append(rejection)
                logger.debug("rejected event: %s", rejection.reason, extra={"event_id": event.event_id})
                continue
            event_id = event.event_id
            if not event_id:
                event_id = derive_event_id(event)
                event.event_id = event_id
                payload = event.SerializeToString()
            if event_id in seen:
                duplicates += 1
                continue
            seen.add(event_id)
            occurred = event.occurred_at
            received = received_us if calls is None else received_us + calls[offset]
            rows.append(
                (
                    event_id,
                    event.user_id,
                    event.item_id,
                    event.type,
                    event.value,
                    occurred.seconds * 1_000_000 + occurred.nanos // 1000,
                    received,
                    payload,
                    owner,
                )
            )
        for rejection in summary.rejections:
            metrics.REJECTED.labels(source, rejection.code).inc()
        if summary.forgotten_indexes:
            summary.forgotten = len(summary.forgotten_indexes)
            metrics.FORGOTTEN_EVENTS.labels(source).inc(summary.forgotten)
        if rows:
            stored = await self.committer.insert(rows)
            # Committed: the events are durable. Publish them even if the caller goes away now.
            await asyncio.shield(self.publisher.publish_in_background(stored))
        else:
            stored = []
        summary.accepted = len(stored)
        summary.duplicates = duplicates + len(rows) - len(stored)
        metrics.ACCEPTED.labels(source).inc(summary.accepted)
        if summary.duplicates:
            metrics.DUPLICATES.labels(source).inc(summary.duplicates)
        return summary
