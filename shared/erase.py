"""Erasing messages from a JetStream stream: what ingestion and inference do for a forgotten user.

JetStream's message delete (``js.delete_msg``; nats-py sends no ``no_erase``, so the server erases:
it overwrites the stored message with random bytes instead of only marking it deleted). The
messages are found by reading the stream (only the given subjects) through an ephemeral pull
consumer without acks, up to its last message at the start.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from shared.nats import fetch_batch

logger = logging.getLogger(__name__)


async def scan(js: JetStreamContext, stream: str, subject: str, batch: int = 500) -> AsyncIterator[Msg]:
    """Every message of ``stream`` on ``subject`` (a filter) up to its last one now, in order."""
    info = await js.stream_info(stream)
    last = int(info.state.last_seq or 0)
    if not info.state.messages:
        return
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        inactive_threshold=30.0,
        max_waiting=1,
    )
    psub = await js.pull_subscribe(subject, stream=stream, config=config)
    try:
        if not (await psub.consumer_info()).num_pending:
            return
        while True:
            msgs = await fetch_batch(psub, batch, timeout_s=2.0)
            if not msgs:
                return
            for msg in msgs:
                meta = msg.metadata
                if meta.sequence.stream > last:
                    return
                yield msg
                if meta.sequence.stream == last or meta.num_pending == 0:
                    return
    finally:
        try:
            await psub.unsubscribe()
        except Exception:  # the consumer expires on its own (inactive_threshold)
            logger.debug("could not unsubscribe the erasure scan consumer", exc_info=True)


async def erase_matching(
    js: JetStreamContext,
    stream: str,
    subject: str,
    match: Callable[[Msg], bool],
    up_to: int | None = None,
) -> tuple[int, int]:
    """Erases the messages ``match`` picks, at or below ``up_to`` if given; returns (erased, left:
    matching messages above ``up_to``)."""
    picked: list[int] = []
    left = 0
    async for msg in scan(js, stream, subject):
        if match(msg):
            seq = int(msg.metadata.sequence.stream)
            if up_to is None or seq <= up_to:
                picked.append(seq)
            else:
                left += 1
    erased = 0
    for seq in picked:
        try:
            erased += bool(await js.delete_msg(stream, seq))
        except NotFoundError:
            pass  # gone already (a redelivered request, the age limit)
    return erased, left
