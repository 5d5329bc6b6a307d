"""Events that producers publish on NATS ``freshrec.events.raw``.

The subject is captured by the JetStream stream ``FRESHREC_RAW``, so a producer's message is
durable as soon as NATS has it, even while ingestion is down; ingestion consumes it with a
durable pull consumer (shared by all replicas) and acks each message only after its events are
committed, published and its bad parts dead-lettered.

What a message may hold:

* the message type is named by the header ``Freshrec-Message-Type``: ``freshrec.v1.Event``
  (the default when the header is absent) or ``freshrec.v1.IngestEventsRequest`` (a batch of at
  most ``max_batch`` events). Binary protobuf cannot tell the two apart by itself, so a batch
  always needs the header;
* the encoding is binary protobuf unless ``Content-Type: application/json``, which selects the
  proto3 JSON mapping (enum names or numbers, RFC 3339 timestamps), so producers in any language
  need no generated code.

What cannot be ingested goes to ``freshrec.events.dlq`` (stream ``FRESHREC_DLQ``) with the
reason in ``Freshrec-Dlq-Reason`` and a stable code in ``Freshrec-Dlq-Code``: the whole message
when it cannot be decoded (or its batch is over the limit), or one dead letter per invalid event
of a batch, holding that event alone (same encoding) with ``Freshrec-Dlq-Index``; the valid
events of the batch are ingested. ``Freshrec-Raw-Sequence`` names the raw message. Each dead
letter has ``Nats-Msg-Id = dlq-<raw seq>[-<index>]``, so a redelivered message is dead-lettered
once; a redelivery arriving after the DLQ's duplicate window is checked against the DLQ itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError

from freshrec.v1 import event_pb2, ingestion_pb2
from services.ingestion import metrics
from services.ingestion.ingestor import Ingestor
from services.ingestion.reconcile import scan_msg_ids
from shared.nats import (
    DLQ_SUBJECT,
    MSG_ID_HEADER,
    RAW_SUBJECT,
    ensure_stream,
    fetch_batch,
    kept_stream_config,
)
from shared.settings import RetentionSettings

logger = logging.getLogger(__name__)

RAW_STREAM = "FRESHREC_RAW"
DLQ_STREAM = "FRESHREC_DLQ"
RAW_CONSUMER = "ingestion-raw"
REASON_HEADER = "Freshrec-Dlq-Reason"
CODE_HEADER = "Freshrec-Dlq-Code"
INDEX_HEADER = "Freshrec-Dlq-Index"
RAW_SEQUENCE_HEADER = "Freshrec-Raw-Sequence"
MESSAGE_TYPE_HEADER = "Freshrec-Message-Type"
CONTENT_TYPE_HEADER = "Content-Type"
JSON_CONTENT_TYPE = "application/json"
EVENT_TYPE = event_pb2.Event.DESCRIPTOR.full_name
BATCH_TYPE = ingestion_pb2.IngestEventsRequest.DESCRIPTOR.full_name


#: How long the raw intake and dead-letter streams keep messages when no retention is set.
RAW_MAX_AGE_S = 7 * 24 * 3600.0
DLQ_MAX_AGE_S = 30 * 24 * 3600.0


async def ensure_intake_streams(
    js: JetStreamContext,
    dlq_duplicate_window_s: float = 600.0,
    replicas: int = 1,
    retention: RetentionSettings | None = None,
) -> None:
    """Declares the raw intake and dead-letter streams (owned by ingestion), kept for their own
    age limit or the retention, whichever is shorter."""
    retention = retention or RetentionSettings()
    raw = kept_stream_config(
        RAW_STREAM, RAW_SUBJECT, replicas=replicas, max_age_s=retention.max_age_s(RAW_MAX_AGE_S)
    )
    dlq = kept_stream_config(
        DLQ_STREAM,
        DLQ_SUBJECT,
        replicas=replicas,
        max_age_s=retention.max_age_s(DLQ_MAX_AGE_S),
        duplicate_window_s=dlq_duplicate_window_s,
    )
    for config in (raw, dlq):
        await ensure_stream(js, config)


async def ensure_raw_consumer(js: JetStreamContext, ack_wait_s: float) -> None:
    """Declares the durable consumer the replicas share; each message is acked on its own.

    An older consumer acking cumulatively (AckPolicy.ALL) is replaced by one that starts where the
    old one had acknowledged everything: with several workers, a cumulative ack would also ack
    messages another worker has not committed yet.
    """
    config = ConsumerConfig(
        durable_name=RAW_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_ack_pending=20_000,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=RAW_SUBJECT,
    )
    try:
        info = await js.consumer_info(RAW_STREAM, RAW_CONSUMER)
    except NotFoundError:
        await js.add_consumer(RAW_STREAM, config)
        return
    if info.config.ack_policy != AckPolicy.EXPLICIT:
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        logger.warning(
            "replacing the raw consumer (cumulative acks) with one that acks per message from %d", floor
        )
        await js.delete_consumer(RAW_STREAM, RAW_CONSUMER)
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = floor + 1
        await js.add_consumer(RAW_STREAM, config)
        return
    with contextlib.suppress(BadRequestError):
        await js.add_consumer(RAW_STREAM, config)  # updates what may change (ack wait, limits)


@dataclass
class DeadLetter:
    """One message (or one event of a batch) that goes to the DLQ."""

    msg: Msg
    code: str
    reason: str
    index: int | None = None
    data: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def raw_seq(self) -> int:
        return int(self.msg.metadata.sequence.stream)

    @property
    def msg_id(self) -> str:
        suffix = "" if self.index is None else f"-{self.index}"
        return f"dlq-{self.raw_seq}{suffix}"


class Undecodable(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def decode(msg: Msg, max_batch: int) -> tuple[list[event_pb2.Event], bool, bytes | None]:
    """The events of a raw message, whether it was JSON, and its bytes when they are one Event."""
    headers = msg.headers or {}
    content_type = headers.get(CONTENT_TYPE_HEADER, "").split(";")[0].strip().lower()
    message_type = headers.get(MESSAGE_TYPE_HEADER, EVENT_TYPE).strip() or EVENT_TYPE
    if message_type not in (EVENT_TYPE, BATCH_TYPE):
        raise Undecodable(
            "unknown_message_type",
            f"{MESSAGE_TYPE_HEADER} {message_type!r} is neither {EVENT_TYPE} nor {BATCH_TYPE}",
        )
    as_json = content_type == JSON_CONTENT_TYPE
    if (
        content_type
        and not as_json
        and content_type not in ("application/protobuf", "application/x-protobuf")
    ):
        raise Undecodable(
            "unsupported_content_type",
            f"Content-Type {content_type!r} is not supported; use application/json or binary protobuf",
        )
    proto: event_pb2.Event | ingestion_pb2.IngestEventsRequest = (
        event_pb2.Event() if message_type == EVENT_TYPE else ingestion_pb2.IngestEventsRequest()
    )
    try:
        if as_json:
            json_format.Parse(msg.data, proto)
        else:
            proto.ParseFromString(msg.data)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
        encoding = "JSON" if as_json else "protobuf"
        raise Undecodable("decode_error", f"not a {encoding} {message_type}: {exc}") from exc
    if isinstance(proto, event_pb2.Event):
        return [proto], as_json, None if as_json else msg.data
    if len(proto.events) > max_batch:
        raise Undecodable(
            "batch_too_large",
            f"batch of {len(proto.events)} events exceeds the limit of {max_batch}; split it",
        )
    return list(proto.events), as_json, None


class RawIntake:
    """Consumes ``freshrec.events.raw`` with several workers and feeds the shared ingestion path."""

    def __init__(
        self,
        js: JetStreamContext,
        ingestor: Ingestor,
        *,
        max_batch: int,
        fetch_messages: int,
        fetch_events: int,
        workers: int,
        dlq_window_s: float,
        clock_skew_s: float,
    ) -> None:
        self.js = js
        self.ingestor = ingestor
        self.max_batch = max_batch
        self.fetch_messages = fetch_messages
        self.fetch_events = fetch_events
        self.workers = workers
        self.dlq_window_s = dlq_window_s
        self.clock_skew_s = clock_skew_s
        #: Raw messages that carried events of forgotten users, erased once acknowledged.
        self.forgotten_raw: set[int] = set()

    async def erase_forgotten(self) -> None:
        """Erases (JetStream message delete, which overwrites) the raw messages that carried events
        of forgotten users: the stream keeps nothing of theirs after their events were dropped."""
        seqs, self.forgotten_raw = self.forgotten_raw, set()
        for seq in sorted(seqs):
            try:
                await self.js.delete_msg(RAW_STREAM, seq)
                metrics.FORGET_ERASED.labels(RAW_STREAM).inc()
            except NotFoundError:
                pass  # gone already (a forget request's own scan, or the age limit)
            except Exception as exc:
                # Left for the forget request's scan of FRESHREC_RAW, which retries until none are left.
                logger.warning("erasing a raw message of a forgotten user failed: %s", exc)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for n in range(self.workers):
                group.create_task(self.worker(), name=f"raw-intake-{n}")

    async def worker(self) -> None:
        psub = await self.js.pull_subscribe_bind(durable=RAW_CONSUMER, stream=RAW_STREAM)
        batch = self.fetch_messages
        try:
            while True:
                msgs = await fetch_batch(psub, batch, timeout_s=1.0)
                if not msgs:
                    continue
                metrics.RAW_MESSAGES.inc(len(msgs))
                try:
                    events = await self.handle(msgs)
                except Exception:
                    # Nothing acked: the messages come back after ack_wait; dedup keeps it exactly-once.
                    logger.exception("raw intake of %d messages failed; they will be redelivered", len(msgs))
                    continue
                for msg in msgs:
                    await msg.ack()
                await self.erase_forgotten()
                # Aim for about fetch_events events per fetch, whatever the messages carry.
                per_message = max(1, events // len(msgs))
                batch = max(1, min(self.fetch_messages, self.fetch_events // per_message))
        finally:
            # A pull subscription left open makes the connection's drain wait for its timeout.
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def handle(self, msgs: list[Msg]) -> int:
        """Ingests a fetched list of raw messages; returns how many events they carried."""
        events: list[event_pb2.Event] = []
        payloads: list[bytes | None] = []
        origins: list[tuple[Msg, int | None, bool]] = []
        calls: list[int] = []
        dead: list[DeadLetter] = []
        for call, msg in enumerate(msgs):
            try:
                decoded, as_json, payload = decode(msg, self.max_batch)
            except Undecodable as exc:
                dead.append(DeadLetter(msg, exc.code, exc.reason, headers=_describe(msg)))
                continue
            single = len(decoded) == 1 and not _is_batch(msg)
            for index, event in enumerate(decoded):
                events.append(event)
                payloads.append(payload)
                origins.append((msg, None if single else index, as_json))
                calls.append(call)
        if events:
            summary = await self.ingestor.ingest(events, "nats", payloads=payloads, calls=calls)
            for index in summary.forgotten_indexes:
                self.forgotten_raw.add(int(origins[index][0].metadata.sequence.stream))
            for error, rejection in zip(summary.errors, summary.rejections, strict=True):
                msg, position, as_json = origins[error.index]
                event = events[error.index]
                if position is None:
                    dead.append(DeadLetter(msg, rejection.code, rejection.reason, headers=_describe(msg)))
                else:
                    data = json_format.MessageToJson(event) if as_json else event.SerializeToString()
                    headers = {MESSAGE_TYPE_HEADER: EVENT_TYPE}
                    if as_json:
                        headers[CONTENT_TYPE_HEADER] = JSON_CONTENT_TYPE
                    dead.append(
                        DeadLetter(
                            msg,
                            rejection.code,
                            rejection.reason,
                            index=position,
                            data=data.encode() if isinstance(data, str) else data,
                            headers=headers,
                        )
                    )
        if dead:
            await self.dead_letter(dead)
        return len(events)

    async def dead_letter(self, dead: list[DeadLetter]) -> None:
        """Publishes dead letters (awaiting JetStream's acks), each exactly once."""
        late = [d for d in dead if self._beyond_dlq_window(d.msg)]
        if late:
            already = await self._already_dead_lettered(late)
            dead = [d for d in dead if d.msg_id not in already]
        futures = []
        for letter in dead:
            headers = {
                **letter.headers,
                REASON_HEADER: letter.reason,
                CODE_HEADER: letter.code,
                RAW_SEQUENCE_HEADER: str(letter.raw_seq),
                MSG_ID_HEADER: letter.msg_id,
            }
            if letter.index is not None:
                headers[INDEX_HEADER] = str(letter.index)
            data = letter.msg.data if letter.data is None else letter.data
            futures.append(await self.js.publish_async(DLQ_SUBJECT, data, headers=headers, stream=DLQ_STREAM))
        for letter, future in zip(dead, futures, strict=True):
            await future  # raises on failure: nothing is acked, the messages come back
            metrics.DLQ.labels(letter.code).inc()
            logger.info("dead-lettered raw message %s: %s", letter.msg_id, letter.reason)

    def _beyond_dlq_window(self, msg: Msg) -> bool:
        """A redelivery so late that JetStream may no longer drop a repeated dead letter."""
        meta = msg.metadata
        if meta.num_delivered <= 1:
            return False
        age = time.time() - meta.timestamp.timestamp()
        return age > self.dlq_window_s / 2

    async def _already_dead_lettered(self, late: list[DeadLetter]) -> set[str]:
        wanted = {d.msg_id for d in late}
        found: set[str] = set()

        async def collect(ids: list[str]) -> None:
            found.update(i for i in ids if i in wanted)

        oldest = min(d.msg.metadata.timestamp.timestamp() for d in late)
        info = await self.js.stream_info(DLQ_STREAM)
        await scan_msg_ids(
            self.js,
            DLQ_STREAM,
            DLQ_SUBJECT,
            int(info.state.last_seq or 0),
            collect,
            start_time_s=oldest - self.clock_skew_s,
        )
        return found


def _is_batch(msg: Msg) -> bool:
    headers = msg.headers or {}
    return headers.get(MESSAGE_TYPE_HEADER, "").strip() == BATCH_TYPE


def _describe(msg: Msg) -> dict[str, str]:
    """The headers that say how to read a raw message's bytes, carried over to its dead letter."""
    headers = msg.headers or {}
    return {k: headers[k] for k in (CONTENT_TYPE_HEADER, MESSAGE_TYPE_HEADER) if k in headers}
