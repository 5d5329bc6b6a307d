"""Events that producers publish on NATS ``freshrec.events.raw``.

The subject is captured by the JetStream stream ``FRESHREC_RAW``, so a producer's message is
durable as soon as NATS has it, even while ingestion is down; ingestion consumes it with a
durable consumer and acks only after the events are committed. A message that cannot be
ingested goes to ``freshrec.events.dlq`` with the reason in a header, once.
"""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from freshrec.v1 import event_pb2
from services.ingestion.ingestor import Ingestor
from shared.nats import DLQ_SUBJECT, RAW_SUBJECT, fetch_batch

logger = logging.getLogger(__name__)

RAW_STREAM = "FRESHREC_RAW"
DLQ_STREAM = "FRESHREC_DLQ"
RAW_CONSUMER = "ingestion-raw"
REASON_HEADER = "Freshrec-Dlq-Reason"


async def ensure_intake_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Declares the raw intake and dead-letter streams (owned by ingestion)."""
    for config in (
        StreamConfig(
            num_replicas=replicas,
            name=RAW_STREAM,
            subjects=[RAW_SUBJECT],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=7 * 24 * 3600,
        ),
        StreamConfig(
            num_replicas=replicas,
            name=DLQ_STREAM,
            subjects=[DLQ_SUBJECT],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=30 * 24 * 3600,
        ),
    ):
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            if getattr(exc, "err_code", None) != 10058:
                raise
            await js.update_stream(config)


class RawIntake:
    """Consumes ``freshrec.events.raw`` and feeds the shared ingestion path."""

    def __init__(self, js: JetStreamContext, ingestor: Ingestor, batch: int) -> None:
        self.js = js
        self.ingestor = ingestor
        self.batch = batch

    async def run(self) -> None:
        psub = await self.js.pull_subscribe(
            RAW_SUBJECT,
            durable=RAW_CONSUMER,
            stream=RAW_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.ALL, ack_wait=60, max_ack_pending=50_000),
        )
        try:
            while True:
                msgs = await fetch_batch(psub, self.batch, timeout_s=1.0)
                if not msgs:
                    continue
                try:
                    await self.handle(msgs)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # Nothing acked: the batch is redelivered after ack_wait; dedup keeps it exactly-once.
                    logger.exception("raw intake batch of %d failed; it will be redelivered", len(msgs))
                    continue
                await msgs[-1].ack()
        finally:
            # A pull subscription left open makes the connection's drain wait for its timeout.
            await psub.unsubscribe()

    async def handle(self, msgs: list[Msg]) -> None:
        events: list[event_pb2.Event] = []
        origins: list[Msg] = []
        for msg in msgs:
            event = event_pb2.Event()
            try:
                event.ParseFromString(msg.data)
            except DecodeError as exc:
                await self.dead_letter(msg, f"not a protobuf freshrec.v1.Event: {exc}")
                continue
            events.append(event)
            origins.append(msg)
        if not events:
            return
        summary = await self.ingestor.ingest(events)
        for error in summary.errors:
            await self.dead_letter(origins[error.index], error.reason)

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        # The DLQ message id derives from the raw message's stream position: a redelivered
        # batch dead-letters each bad message once.
        headers = {REASON_HEADER: reason, "Nats-Msg-Id": f"dlq-{msg.metadata.sequence.stream}"}
        await self.js.publish(DLQ_SUBJECT, msg.data, headers=headers, stream=DLQ_STREAM)
        logger.info("dead-lettered raw message %d: %s", msg.metadata.sequence.stream, reason)
