"""StreamReader on a real nats-server: in order, from the owner's position, through redeliveries
and delivery gaps, never skipping a message and never returning one twice."""

from __future__ import annotations

from freshrec.v1 import event_pb2
from shared.nats import MSG_ID_HEADER, StreamReader, accepted_subject, ensure_events_stream
from tests.conftest import eventually


async def publish(js, n: int, start: int = 0) -> None:  # type: ignore[no-untyped-def]
    await ensure_events_stream(js)
    for i in range(start, start + n):
        e = event_pb2.Event(event_id=f"e{i}", user_id=f"u{i}", item_id="i", type=event_pb2.EVENT_TYPE_VIEW)
        subject = accepted_subject("EVENT_TYPE_VIEW", e.user_id)
        await js.publish(subject, e.SerializeToString(), headers={MSG_ID_HEADER: e.event_id})


async def read_all(reader: StreamReader, expected: int) -> list[int]:
    seen: list[int] = []

    async def done() -> bool:
        seen.extend(m.metadata.sequence.stream for m in await reader.fetch(100, timeout_s=0.2))
        return len(seen) >= expected

    await eventually(done, what=f"{expected} messages")
    return seen


async def test_resumes_at_the_owners_position_without_waiting_for_redelivery(nats_client) -> None:
    js = nats_client.jetstream()
    await publish(js, 10)
    first = StreamReader(js, "reader-test", ack_wait_s=300)
    await first.seat(0)
    assert await read_all(first, 10) == list(range(1, 11))
    await first.close()  # "crashed" after committing only up to sequence 4, nothing acked

    again = StreamReader(js, "reader-test", ack_wait_s=300)
    await again.seat(4)
    await publish(js, 3, start=10)
    assert await read_all(again, 9) == list(range(5, 14))
    await again.close()


async def test_redeliveries_are_skipped(nats_client) -> None:
    js = nats_client.jetstream()
    await publish(js, 5)
    reader = StreamReader(js, "redelivery-test", ack_wait_s=1)
    await reader.seat(0)
    assert await read_all(reader, 5) == [1, 2, 3, 4, 5]
    # Nothing acked: after the ack wait the server sends 1..5 again; the reader returns none of them.
    await publish(js, 1, start=5)
    returned: list[int] = []

    async def redelivered() -> bool:
        returned.extend(m.metadata.sequence.stream for m in await reader.fetch(100, timeout_s=0.3))
        info = await js.consumer_info("FRESHREC_EVENTS", "redelivery-test")
        return info.num_redelivered >= 5

    await eventually(redelivered, what="1..5 to be redelivered")
    assert returned == [6]
    await reader.close()


async def test_a_delivery_gap_reseats_instead_of_skipping(nats_client) -> None:
    js = nats_client.jetstream()
    await publish(js, 6)
    reader = StreamReader(js, "gap-test", ack_wait_s=300)
    await reader.seat(0)
    assert [m.metadata.sequence.stream for m in await reader.fetch(2, timeout_s=2)] == [1, 2]
    # Another subscriber bound to the same consumer takes deliveries 3 and 4: to our reader they
    # are lost in transit, exactly like messages delivered to a connection that then dropped.
    thief = await js.pull_subscribe_bind("gap-test", stream="FRESHREC_EVENTS")
    stolen = await thief.fetch(2, timeout=2)
    assert [m.metadata.sequence.stream for m in stolen] == [3, 4]
    await thief.unsubscribe()
    assert await read_all(reader, 4) == [3, 4, 5, 6]
    await reader.close()
