"""NATS names and helpers shared by the services.

The stream and subject names here are part of freshrec's public contract: event producers
and other consumers rely on them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import zlib

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

from shared.settings import NatsSettings, TlsSettings

logger = logging.getLogger(__name__)

#: JetStream stream holding every accepted event, in acceptance order.
EVENTS_STREAM = "FRESHREC_EVENTS"
#: Accepted events are published on ``freshrec.events.accepted.<type>.<partition>``: the type in
#: lower case, the partition ``user_partition(user_id)``. Subscribe to ``freshrec.events.accepted.>``
#: for everything, ``freshrec.events.accepted.purchase.*`` for one type, or
#: ``freshrec.events.accepted.*.<p>`` for one partition (how feature replicas split users).
ACCEPTED_SUBJECT_PREFIX = "freshrec.events.accepted"
ACCEPTED_SUBJECTS = f"{ACCEPTED_SUBJECT_PREFIX}.>"
#: Number of user partitions in the subject; the most replicas that can split users between them.
EVENT_PARTITIONS = 64
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


def user_partition(user_id: str) -> int:
    """The partition of a user: CRC-32 (zlib, IEEE) of the UTF-8 id modulo ``EVENT_PARTITIONS``.

    Stable across processes and languages, so producers, ingestion and consumers agree.
    """
    return zlib.crc32(user_id.encode("utf-8")) % EVENT_PARTITIONS


def accepted_subject(event_type_name: str, user_id: str) -> str:
    """``EVENT_TYPE_PURCHASE``, ``alice`` -> ``freshrec.events.accepted.purchase.<partition of alice>``."""
    kind = event_type_name.removeprefix("EVENT_TYPE_").lower()
    return f"{ACCEPTED_SUBJECT_PREFIX}.{kind}.{user_partition(user_id)}"


def partition_filter_subjects(replica: int, replicas: int) -> list[str]:
    """The subject filters of replica ``replica`` (0-based) of ``replicas``: the partitions ``p``
    with ``p % replicas == replica``; one replica gets everything."""
    if not 0 <= replica < replicas <= EVENT_PARTITIONS:
        raise ValueError(f"replica {replica} of {replicas} is not valid (at most {EVENT_PARTITIONS})")
    if replicas == 1:
        return [ACCEPTED_SUBJECTS]
    return [f"{ACCEPTED_SUBJECT_PREFIX}.*.{p}" for p in range(EVENT_PARTITIONS) if p % replicas == replica]


async def connect(settings: NatsSettings, name: str) -> NatsClient:
    """Connects, trying ``connect_attempts`` times; once connected, reconnects forever.

    Raises ``ConnectionError`` with what to check when the first connection cannot be made.
    """
    # nats-py can hang after a failed TLS handshake instead of counting the attempt: bound the wait.
    give_up_after = settings.connect_attempts * (settings.connect_timeout_s + settings.reconnect_wait_s) + 2
    try:
        nc = await asyncio.wait_for(_connect(settings, name), give_up_after)
    except Exception as exc:
        raise ConnectionError(
            f"cannot connect to NATS at {settings.url} after {settings.connect_attempts} attempts ({exc!r}); "
            "check FRESHREC_NATS__URL, the credentials (FRESHREC_NATS__USER/PASSWORD/TOKEN/CREDS_FILE) "
            "and FRESHREC_NATS__TLS__CA_FILE"
        ) from exc
    # From now on ride out any outage: nats-py reads this option at every reconnection.
    nc.options["max_reconnect_attempts"] = -1
    return nc


async def _on_error(exc: Exception) -> None:
    logger.warning("nats error: %s", exc)


async def _on_disconnect() -> None:
    logger.warning("nats disconnected")


async def _on_reconnect() -> None:
    logger.info("nats reconnected")


async def _connect(settings: NatsSettings, name: str) -> NatsClient:
    return await nats.connect(
        servers=settings.servers,
        name=name,
        user=settings.user,
        password=settings.password.get_secret_value() if settings.password else None,
        token=settings.token.get_secret_value() if settings.token else None,
        user_credentials=str(settings.creds_file) if settings.creds_file else None,
        nkeys_seed=str(settings.nkey_seed_file) if settings.nkey_seed_file else None,
        tls=tls_context(settings.tls),
        connect_timeout=settings.connect_timeout_s,
        reconnect_time_wait=settings.reconnect_wait_s,
        max_reconnect_attempts=settings.connect_attempts,
        allow_reconnect=True,
        error_cb=_on_error,
        disconnected_cb=_on_disconnect,
        reconnected_cb=_on_reconnect,
    )


def tls_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """A client TLS context for NATS, or None for plaintext."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


def events_stream_config(duplicate_window_s: float = 120.0, replicas: int = 1) -> StreamConfig:
    """The configuration of ``FRESHREC_EVENTS``: file storage, limits retention, dedup window."""
    return StreamConfig(
        num_replicas=replicas,
        name=EVENTS_STREAM,
        subjects=[ACCEPTED_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=duplicate_window_s,
    )


async def ensure_events_stream(
    js: JetStreamContext, duplicate_window_s: float = 120.0, *, owner: bool = False, replicas: int = 1
) -> None:
    """Declares ``FRESHREC_EVENTS`` idempotently at start.

    Consumers call it so they can start before ingestion; only the owner (ingestion) brings
    an existing stream's configuration up to date.
    """
    config = events_stream_config(duplicate_window_s, replicas)
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        # 10058: a stream with that name exists with a different configuration.
        if getattr(exc, "err_code", None) != 10058:
            raise
        if owner:
            await js.update_stream(config)


def catalog_stream_config(replicas: int = 1) -> StreamConfig:
    """The configuration of ``FRESHREC_CATALOG``: every accepted catalogue entry, kept (file storage,
    limits retention, no age limit) so a follower can rebuild the catalogue from sequence 1."""
    return StreamConfig(
        num_replicas=replicas,
        name=CATALOG_STREAM,
        subjects=[CATALOG_ACCEPTED_SUBJECT],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=120.0,
    )


async def ensure_catalog_stream(js: JetStreamContext, *, owner: bool = False, replicas: int = 1) -> None:
    """Declares ``FRESHREC_CATALOG`` idempotently (the feature service owns it; followers such as
    the trainer and inference may call it too so they can start first)."""
    config = catalog_stream_config(replicas)
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
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
    filter_subjects: list[str] | None = None,
) -> JetStreamContext.PullSubscription:
    """A durable pull consumer on ``FRESHREC_EVENTS``.

    With ``ack_all`` one ack covers every earlier message, so a consumer acks once per
    committed batch (or checkpoint) instead of once per event. ``filter_subjects`` (several
    filters, e.g. ``partition_filter_subjects``) replaces ``filter_subject``.
    """
    several = filter_subjects is not None and len(filter_subjects) > 1
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.ALL if ack_all else AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_ack_pending=max_ack_pending,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=None if several else (filter_subjects or [filter_subject])[0],
        filter_subjects=filter_subjects if several else None,
    )
    subject = (filter_subjects or [filter_subject])[0]
    return await js.pull_subscribe(subject, durable=durable, stream=EVENTS_STREAM, config=config)


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
