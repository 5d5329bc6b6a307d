"""Erasing a forgotten user's messages from the streams ingestion owns.

JetStream's message delete (``shared/erase.py``: erased, not only marked deleted) removes each
message of the user from ``FRESHREC_EVENTS`` (only the user's partition subjects are read),
``FRESHREC_RAW`` and ``FRESHREC_DLQ``. A raw message is only erased once the shared raw consumer
has acknowledged it (its events are in the log, or were dropped by the tombstone, which erases the
message itself); one still waiting keeps the request pending until then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from freshrec.v1 import event_pb2
from services.ingestion import metrics
from services.ingestion.nats_intake import DLQ_STREAM, RAW_CONSUMER, RAW_STREAM, Undecodable, decode
from shared.erase import erase_matching
from shared.nats import ACCEPTED_SUBJECT_PREFIX, DLQ_SUBJECT, EVENTS_STREAM, RAW_SUBJECT, user_partition

logger = logging.getLogger(__name__)

#: A raw or dead-letter message may be a batch of up to this many events (any batch limit fits).
ANY_BATCH = 1 << 30


def carries_user(msg: Msg, user_id: str) -> bool:
    """Whether a raw message or dead letter holds anything of ``user_id``: one of its events is the
    user's, or (it cannot be decoded) its bytes contain the id."""
    try:
        events, _, _ = decode(msg, ANY_BATCH)
    except Undecodable:
        return user_id.encode("utf-8") in msg.data
    return any(e.user_id == user_id for e in events)


def users_event(msg: Msg, user_id: str) -> bool:
    event = event_pb2.Event()
    try:
        event.ParseFromString(msg.data)
    except Exception:  # ingestion publishes only events; anything else is not the user's
        return user_id.encode("utf-8") in msg.data
    return event.user_id == user_id


async def erase_where(
    js: JetStreamContext,
    stream: str,
    subject: str,
    match: Callable[[Msg], bool],
    up_to: int | None = None,
) -> tuple[int, int]:
    """``erase_matching``, counted in ``freshrec_ingestion_forget_erased_total``."""
    erased, left = await erase_matching(js, stream, subject, match, up_to)
    if erased:
        metrics.FORGET_ERASED.labels(stream).inc(erased)
    return erased, left


async def erase_user_messages(js: JetStreamContext, user_id: str) -> tuple[int, int]:
    """Erases the user's messages from FRESHREC_EVENTS, FRESHREC_DLQ and (acknowledged ones)
    FRESHREC_RAW; returns (erased, raw messages of the user not yet acknowledged)."""
    partition = f"{ACCEPTED_SUBJECT_PREFIX}.*.{user_partition(user_id)}"
    events, _ = await erase_where(js, EVENTS_STREAM, partition, lambda m: users_event(m, user_id))
    dead, _ = await erase_where(js, DLQ_STREAM, DLQ_SUBJECT, lambda m: carries_user(m, user_id))
    try:
        info = await js.consumer_info(RAW_STREAM, RAW_CONSUMER)
        floor = int(info.ack_floor.stream_seq) if info.ack_floor else 0
    except NotFoundError:
        floor = 0
    raw, left = await erase_where(
        js, RAW_STREAM, RAW_SUBJECT, lambda m: carries_user(m, user_id), up_to=floor
    )
    return events + dead + raw, left
