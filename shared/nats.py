"""NATS names and helpers shared by the services.

The stream and subject names here are part of freshrec's public contract: event producers
and other consumers rely on them.
"""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from shared.settings import NatsSettings

logger = logging.getLogger(__name__)

#: JetStream stream holding every accepted event, in acceptance order.
EVENTS_STREAM = "FRESHREC_EVENTS"
#: Accepted events are published on ``freshrec.events.accepted.<type>`` (type in lower case).
ACCEPTED_SUBJECT_PREFIX = "freshrec.events.accepted"
ACCEPTED_SUBJECTS = f"{ACCEPTED_SUBJECT_PREFIX}.>"
#: Producers publish raw events (protobuf or JSON) here for ingestion to validate and accept.
RAW_SUBJECT = "freshrec.events.raw"
#: Messages that could not be ingested land here, with the reason in a header.
DLQ_SUBJECT = "freshrec.events.dlq"
#: The live model version changed (new export, promotion or rollback).
MODELS_PUBLISHED_SUBJECT = "freshrec.models.published"
#: Catalogue entries published by producers (feature service input, validated there).
CATALOG_ITEMS_SUBJECT = "freshrec.catalog.items"
#: JetStream stream of validated catalogue entries (protobuf ``Item``), published by the feature
#: service after each accepted upsert; the trainer and inference follow it.
CATALOG_STREAM = "FRESHREC_CATALOG"
CATALOG_ACCEPTED_SUBJECT = "freshrec.catalog.accepted"

#: The header carrying a message's idempotency key; JetStream drops repeats within its window.
MSG_ID_HEADER = "Nats-Msg-Id"


def accepted_subject(event_type_name: str) -> str:
    """``EVENT_TYPE_PURCHASE`` -> ``freshrec.events.accepted.purchase``."""
    return f"{ACCEPTED_SUBJECT_PREFIX}.{event_type_name.removeprefix('EVENT_TYPE_').lower()}"


async def connect(settings: NatsSettings, name: str) -> NatsClient:
    """Connects with reconnection forever, logging disconnects; raises if the first connect fails."""

    async def on_error(exc: Exception) -> None:
        logger.warning("nats error: %s", exc)

    async def on_disconnect() -> None:
        logger.warning("nats disconnected")

    async def on_reconnect() -> None:
        logger.info("nats reconnected")

    return await nats.connect(
        servers=settings.servers,
        name=name,
        user=settings.user,
        password=settings.password.get_secret_value() if settings.password else None,
        connect_timeout=settings.connect_timeout_s,
        reconnect_time_wait=settings.reconnect_wait_s,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )


def events_stream_config(duplicate_window_s: float = 120.0) -> StreamConfig:
    """The configuration of ``FRESHREC_EVENTS``: file storage, limits retention, dedup window."""
    return StreamConfig(
        name=EVENTS_STREAM,
        subjects=[ACCEPTED_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=duplicate_window_s,
    )


async def ensure_events_stream(
    js: JetStreamContext, duplicate_window_s: float = 120.0, *, owner: bool = False
) -> None:
    """Declares ``FRESHREC_EVENTS`` idempotently at start.

    Consumers call it so they can start before ingestion; only the owner (ingestion) brings
    an existing stream's configuration up to date.
    """
    config = events_stream_config(duplicate_window_s)
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        # 10058: a stream with that name exists with a different configuration.
        if getattr(exc, "err_code", None) != 10058:
            raise
        if owner:
            await js.update_stream(config)


async def pull_subscribe_events(
    js: JetStreamContext,
    durable: str,
    *,
    filter_subject: str = ACCEPTED_SUBJECTS,
    ack_wait_s: float = 30.0,
    max_ack_pending: int = 100_000,
    ack_all: bool = True,
) -> JetStreamContext.PullSubscription:
    """A durable pull consumer on ``FRESHREC_EVENTS``.

    With ``ack_all`` one ack covers every earlier message, so a consumer acks once per
    committed batch (or checkpoint) instead of once per event.
    """
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.ALL if ack_all else AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_ack_pending=max_ack_pending,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=filter_subject,
    )
    return await js.pull_subscribe(filter_subject, durable=durable, stream=EVENTS_STREAM, config=config)


async def fetch_batch(psub: JetStreamContext.PullSubscription, batch: int, timeout_s: float) -> list[Msg]:
    """Fetches up to ``batch`` messages; an empty list when none arrive within the timeout."""
    try:
        return await psub.fetch(batch, timeout=timeout_s)
    except (TimeoutError, nats.errors.TimeoutError):
        # nats-py turns a cancellation during fetch into a timeout: let the cancellation through.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None
        return []
