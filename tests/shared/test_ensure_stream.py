"""ensure_stream on a real nats-server: declaring twice is harmless, the owner's declaration brings a
changed configuration up to date, a follower's leaves it, and other errors are not swallowed."""

from __future__ import annotations

import pytest
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError

from shared.nats import ensure_stream


async def test_adds_then_updates_only_when_asked(nats_client) -> None:  # type: ignore[no-untyped-def]
    js = nats_client.jetstream()

    def config(max_msgs: int) -> StreamConfig:
        return StreamConfig(name="ENSURE_TEST", subjects=["ensure.a"], max_msgs=max_msgs)

    await ensure_stream(js, config(10))
    await ensure_stream(js, config(10))

    await ensure_stream(js, config(20), update=False)
    assert (await js.stream_info("ENSURE_TEST")).config.max_msgs == 10

    await ensure_stream(js, config(20))
    assert (await js.stream_info("ENSURE_TEST")).config.max_msgs == 20


async def test_other_errors_are_raised(nats_client) -> None:  # type: ignore[no-untyped-def]
    js = nats_client.jetstream()
    await ensure_stream(js, StreamConfig(name="ENSURE_ONE", subjects=["ensure.same"]))
    with pytest.raises(BadRequestError):  # subjects overlap another stream's: not "name in use"
        await ensure_stream(js, StreamConfig(name="ENSURE_TWO", subjects=["ensure.same"]))
