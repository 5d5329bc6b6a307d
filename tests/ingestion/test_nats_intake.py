"""The NATS entry point: protobuf or JSON, one event or a batch, and the dead-letter queue."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import nats
from google.protobuf import json_format
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from freshrec.v1 import event_pb2, ingestion_pb2
from services.ingestion.nats_intake import (
    CODE_HEADER,
    DLQ_STREAM,
    INDEX_HEADER,
    RAW_CONSUMER,
    RAW_SEQUENCE_HEADER,
    RAW_STREAM,
    REASON_HEADER,
    RawIntake,
)
from shared.nats import DLQ_SUBJECT, MSG_ID_HEADER, RAW_SUBJECT
from tests.conftest import eventually
from tests.factories import event
from tests.harness import NatsServer
from tests.ingestion.conftest import AppFactory
from tests.ingestion.helpers import stream_events, stream_ids

BATCH = {"Freshrec-Message-Type": "freshrec.v1.IngestEventsRequest"}
JSON = {"Content-Type": "application/json"}


async def dead_letters(url: str, expected: int) -> list[Any]:
    """The DLQ's messages once it holds ``expected`` of them (and checks there are no more)."""
    nc = await nats.connect(url)
    js = nc.jetstream()

    async def count() -> int:
        return int((await js.stream_info(DLQ_STREAM)).state.messages) >= expected

    await eventually(count, what=f"{expected} dead letters")
    sub = await js.subscribe(DLQ_SUBJECT, stream=DLQ_STREAM, ordered_consumer=True)
    msgs = [await sub.next_msg(timeout=10) for _ in range(expected)]
    info = await js.stream_info(DLQ_STREAM)
    await nc.close()
    assert info.state.messages == expected, "more dead letters than expected"
    return msgs


async def wait_for_ids(url: str, n: int) -> list[str]:
    async def enough() -> list[str] | None:
        ids = await stream_ids(url)
        return ids if len(ids) >= n else None

    ids: list[str] = await eventually(enough, what=f"{n} events in FRESHREC_EVENTS")
    return ids


async def raw_consumer_done(js: Any) -> bool:
    info = await js.consumer_info(RAW_STREAM, RAW_CONSUMER)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_protobuf_and_json_events_and_batches(
    make_app: AppFactory, nats_server: NatsServer, nats_client
) -> None:
    await make_app()
    js = nats_client.jetstream()
    single = event("u1", "i1", event_id="pb-1")
    await js.publish(RAW_SUBJECT, single.SerializeToString())
    batch = ingestion_pb2.IngestEventsRequest(
        events=[event("u2", f"i{n}", event_id=f"pb-batch-{n}") for n in range(3)]
    )
    await js.publish(RAW_SUBJECT, batch.SerializeToString(), headers=BATCH)
    as_json = {
        "eventId": "json-1",
        "userId": "u3",
        "itemId": "i3",
        "type": "EVENT_TYPE_RATE",
        "value": 4,
        "occurredAt": "2026-01-02T03:04:05Z",
        "context": {"device": "ios"},
    }
    await js.publish(RAW_SUBJECT, json.dumps(as_json).encode(), headers=JSON)
    json_batch = {"events": [{**as_json, "eventId": f"json-batch-{n}", "type": 2} for n in range(2)]}
    await js.publish(RAW_SUBJECT, json.dumps(json_batch).encode(), headers={**JSON, **BATCH})
    # An event without id gets one derived from its content, here too.
    anonymous = event("u4", "i4", at=1_700_000_000)
    await js.publish(RAW_SUBJECT, anonymous.SerializeToString())

    ids = await wait_for_ids(nats_server.url, 8)
    derived = [i for i in ids if i.startswith("derived-")]
    assert sorted(set(ids) - set(derived)) == sorted(
        ["pb-1", *[f"pb-batch-{n}" for n in range(3)], "json-1", "json-batch-0", "json-batch-1"]
    )
    published = {h[MSG_ID_HEADER]: e for _, e, h in await stream_events(nats_server.url)}
    assert published["pb-1"] == single
    rated = published["json-1"]
    assert (rated.type, rated.value, dict(rated.context)) == (
        event_pb2.EVENT_TYPE_RATE,
        4.0,
        {"device": "ios"},
    )
    assert rated.occurred_at.ToSeconds() == 1767323045
    assert len(derived) == 1 and len(ids) == 8 and published[derived[0]].event_id == derived[0]
    await eventually(lambda: raw_consumer_done(js), what="every raw message acked")


async def test_bad_messages_go_to_the_dlq_with_their_reason(
    make_app: AppFactory, nats_server: NatsServer, nats_client
) -> None:
    await make_app(max_batch=3)
    js = nats_client.jetstream()
    garbage = b"\xff\xff not a protobuf"
    await js.publish(RAW_SUBJECT, garbage)
    await js.publish(RAW_SUBJECT, b"{not json", headers=JSON)
    await js.publish(RAW_SUBJECT, b"", headers={"Freshrec-Message-Type": "freshrec.v1.Item"})
    await js.publish(RAW_SUBJECT, b"a,b,c", headers={"Content-Type": "text/csv"})
    too_big = ingestion_pb2.IngestEventsRequest(events=[event("u", f"i{n}") for n in range(4)])
    await js.publish(RAW_SUBJECT, too_big.SerializeToString(), headers=BATCH)
    await js.publish(RAW_SUBJECT, event("u9", "", event_id="raw-bad").SerializeToString())

    dead = {m.headers[CODE_HEADER]: m for m in await dead_letters(nats_server.url, 6)}
    assert (
        set(dead)
        == {
            "decode_error",
            "unknown_message_type",
            "unsupported_content_type",
            "batch_too_large",
            "item_id_empty",
        }
        and len(dead) == 5
    )  # two decode errors share a code
    assert dead["item_id_empty"].headers[REASON_HEADER] == "item_id is empty"
    assert event_pb2.Event.FromString(dead["item_id_empty"].data).event_id == "raw-bad"
    assert (
        dead["batch_too_large"].headers[REASON_HEADER].startswith("batch of 4 events exceeds the limit of 3")
    )
    assert dead["batch_too_large"].headers["Freshrec-Message-Type"] == "freshrec.v1.IngestEventsRequest"
    assert "freshrec.v1.Item" in dead["unknown_message_type"].headers[REASON_HEADER]
    assert "text/csv" in dead["unsupported_content_type"].headers[REASON_HEADER]
    reasons = sorted(m.headers[REASON_HEADER] for m in await dead_letters(nats_server.url, 6))
    assert any(r.startswith("not a protobuf freshrec.v1.Event") for r in reasons)
    assert any(r.startswith("not a JSON freshrec.v1.Event") for r in reasons)
    assert await stream_ids(nats_server.url) == []
    await eventually(lambda: raw_consumer_done(js), what="bad messages acked, not retried forever")


async def test_a_batch_accepts_its_good_events_and_dead_letters_each_bad_one(
    make_app: AppFactory, nats_server: NatsServer, nats_client
) -> None:
    await make_app()
    js = nats_client.jetstream()
    events = [
        event("u", "i0", event_id="ok-0"),
        event("u", "", event_id="no-item"),
        event("u", "i2", event_id="ok-2"),
        event("u", "i3", event_id="bad-type", type=event_pb2.EVENT_TYPE_UNSPECIFIED),
    ]
    ack = await js.publish(
        RAW_SUBJECT, ingestion_pb2.IngestEventsRequest(events=events).SerializeToString(), headers=BATCH
    )
    json_events = [json.loads(json_format.MessageToJson(e)) for e in events[:2]]
    json_ack = await js.publish(
        RAW_SUBJECT, json.dumps({"events": json_events}).encode(), headers={**JSON, **BATCH}
    )

    ids = await wait_for_ids(nats_server.url, 2)
    dead = await dead_letters(nats_server.url, 3)
    assert sorted(ids) == ["ok-0", "ok-2"]  # the JSON batch's good event is a duplicate of ok-0
    by_id = {m.headers[MSG_ID_HEADER]: m for m in dead}
    assert set(by_id) == {f"dlq-{ack.seq}-1", f"dlq-{ack.seq}-3", f"dlq-{json_ack.seq}-1"}
    no_item = by_id[f"dlq-{ack.seq}-1"]
    assert (no_item.headers[INDEX_HEADER], no_item.headers[RAW_SEQUENCE_HEADER]) == ("1", str(ack.seq))
    assert no_item.headers[REASON_HEADER] == "item_id is empty"
    assert event_pb2.Event.FromString(no_item.data) == events[1]  # the event alone, in its encoding
    assert by_id[f"dlq-{ack.seq}-3"].headers[CODE_HEADER] == "type_unspecified"
    from_json = by_id[f"dlq-{json_ack.seq}-1"]
    assert from_json.headers["Content-Type"] == "application/json"
    assert json.loads(from_json.data)["eventId"] == "no-item"


async def test_a_redelivered_bad_message_is_dead_lettered_once(
    make_app: AppFactory, nats_server: NatsServer, nats_client
) -> None:
    # A DLQ duplicate window of 1 s: the second delivery comes after it, so only the DLQ lookup
    # (not JetStream's deduplication) can keep the dead letter single.
    app = await make_app(dlq_duplicate_window_s=1.0)
    assert app.ingestor is not None
    js = nats_client.jetstream()
    bad = event("u", "", event_id="twice")
    ack = await js.publish(RAW_SUBJECT, bad.SerializeToString())
    first = await dead_letters(nats_server.url, 1)  # the service dead-lettered it and acked it
    assert first[0].headers[MSG_ID_HEADER] == f"dlq-{ack.seq}"

    # The same raw message delivered again, later (as after a crash between dead-lettering and
    # acking): a consumer of our own with a short ack wait redelivers it.
    psub = await js.pull_subscribe(
        RAW_SUBJECT,
        durable="redeliver",
        stream=RAW_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=1.5, deliver_policy=DeliverPolicy.ALL),
    )
    delivered = await psub.fetch(1, timeout=5)
    assert delivered[0].metadata.sequence.stream == ack.seq
    await asyncio.sleep(2.0)  # past the ack wait and past the DLQ's duplicate window
    again = await psub.fetch(1, timeout=5)
    assert again[0].metadata.num_delivered == 2
    intake = RawIntake(
        js,
        app.ingestor,
        max_batch=1000,
        fetch_messages=10,
        fetch_events=100,
        workers=1,
        dlq_window_s=1.0,
        clock_skew_s=1.0,
    )
    started = time.monotonic()
    await intake.handle(again)
    await intake.handle(again)
    assert time.monotonic() - started < 10
    await dead_letters(nats_server.url, 1)
