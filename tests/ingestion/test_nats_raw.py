"""The private nats-py methods behind the fast publish path: still there, still shaped as expected,
and a hand-encoded HPUB still reaches a subscriber of a real nats-server intact. If nats-py changes
them, this fails instead of ingestion silently falling back to the slow path."""

from __future__ import annotations

import asyncio
import inspect

from nats.aio.client import Client as NatsClient

from services.ingestion.nats_raw import raw_sender


def test_the_private_methods_exist_with_the_expected_parameters() -> None:
    assert inspect.iscoroutinefunction(NatsClient._send_command)
    assert inspect.iscoroutinefunction(NatsClient._flush_pending)
    assert list(inspect.signature(NatsClient._send_command).parameters)[:2] == ["self", "cmd"]
    flush = inspect.signature(NatsClient._flush_pending).parameters
    assert all(p.default is not inspect.Parameter.empty for name, p in flush.items() if name != "self")


async def test_a_hand_encoded_hpub_arrives_with_its_reply_headers_and_payload(nats_client) -> None:  # type: ignore[no-untyped-def]
    send = raw_sender(nats_client)
    assert send is not None, "nats-py no longer has _send_command/_flush_pending: the fast path is gone"
    received: asyncio.Queue = asyncio.Queue()  # type: ignore[type-arg]
    await nats_client.subscribe("raw.test", cb=received.put)
    await nats_client.flush()
    header = b"NATS/1.0\r\nNats-Msg-Id: m1\r\nFreshrec-Test: yes\r\n\r\n"
    payload = b"\x00binary\r\npayload"
    frame = b"HPUB raw.test reply.to.1 %d %d\r\n%s%s\r\n" % (
        len(header),
        len(header) + len(payload),
        header,
        payload,
    )
    await send(frame + frame.replace(b"m1", b"m2"))
    first, second = [await asyncio.wait_for(received.get(), 5) for _ in range(2)]
    assert first.data == payload and first.reply == "reply.to.1"
    assert first.headers == {"Nats-Msg-Id": "m1", "Freshrec-Test": "yes"}
    assert second.headers["Nats-Msg-Id"] == "m2"
