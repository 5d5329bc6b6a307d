"""follow_stream on a real nats-server: from just after the follower's own position, in order, in
batches; after ``apply`` fails, again from the position the follower recorded, nothing skipped."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from shared.nats import follow_stream


async def test_follows_from_its_position_and_resumes_after_a_failure(nats_client, caplog) -> None:  # type: ignore[no-untyped-def]
    js = nats_client.jetstream()
    await js.add_stream(StreamConfig(name="FOLLOW_TEST", subjects=["follow.test"]))
    for n in range(1, 11):
        await js.publish("follow.test", str(n).encode())

    applied: list[int] = []
    recorded = 3  # the follower had applied up to sequence 3 before it started
    starts: list[int] = []
    failed_once = False
    caught_up, done = asyncio.Event(), asyncio.Event()

    async def position() -> int:
        starts.append(recorded)
        return recorded

    async def apply(msgs: list[Msg]) -> None:
        nonlocal recorded, failed_once
        assert len(msgs) <= 4
        sequences = [m.metadata.sequence.stream for m in msgs]
        if 8 in sequences and not failed_once:  # fails before recording this batch
            failed_once = True
            raise RuntimeError("the store is unavailable")
        applied.extend(int(m.data) for m in msgs)
        recorded = sequences[-1]
        if recorded >= 10:
            caught_up.set()
        if recorded >= 12:
            done.set()

    follower = asyncio.create_task(
        follow_stream(
            js,
            "FOLLOW_TEST",
            "follow.test",
            position=position,
            apply=apply,
            name="test",
            batch=4,
            retry_s=0.05,
        )
    )
    try:
        with caplog.at_level(logging.ERROR, logger="shared.nats"):
            await asyncio.wait_for(caught_up.wait(), 10)
            for n in (11, 12):  # arriving once the follower has caught up
                await js.publish("follow.test", str(n).encode())
            await asyncio.wait_for(done.wait(), 10)
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)

    assert failed_once and "following FOLLOW_TEST failed" in caplog.text
    assert starts[0] == 3 and len(starts) == 2 and 3 < starts[1] < 8
    # every message after the first start exactly once and in order, none before it
    assert applied == list(range(4, 13))
