"""Ingestion on real parts: gRPC in, SQLite event log, JetStream out, NATS raw intake, DLQ."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from freshrec.v1 import event_pb2, ingestion_pb2, ingestion_pb2_grpc
from services.ingestion.server import IngestionApp
from services.ingestion.settings import IngestionSettings
from services.ingestion.validation import derive_event_id
from shared.nats import EVENTS_STREAM, MSG_ID_HEADER, user_partition
from tests.conftest import eventually, service_settings
from tests.factories import event


@pytest.fixture
async def ingestion(nats_server, tmp_path: Path) -> AsyncIterator[IngestionApp]:
    app = IngestionApp(service_settings(IngestionSettings, nats_server, tmp_path, max_batch=50))
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def stub(ingestion: IngestionApp) -> AsyncIterator[ingestion_pb2_grpc.IngestionServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ingestion.port}") as channel:
        yield ingestion_pb2_grpc.IngestionServiceStub(channel)


async def stream_messages(nats_client, expected: int):  # type: ignore[no-untyped-def]
    js = nats_client.jetstream()
    sub = await js.subscribe(
        "freshrec.events.accepted.>",
        stream=EVENTS_STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    msgs = []

    async def got_all() -> bool:
        while len(msgs) < expected:
            try:
                msgs.append(await sub.next_msg(timeout=0.2))
            except Exception:
                return False
        return True

    await eventually(got_all, what=f"{expected} messages on {EVENTS_STREAM}")
    info = await js.stream_info(EVENTS_STREAM)
    await sub.unsubscribe()
    return msgs, info.state.messages


async def test_accepts_dedups_and_rejects_per_event(stub, nats_client) -> None:
    events = [
        event("u1", "i1", event_id="e1"),
        event("u1", "i2", event_id="e2"),
        event("u1", "i2", event_id="e2"),  # repeated within the batch
        event("", "i3", event_id="bad-user"),
        event("u2", "i4", event_id="bad-type", type=event_pb2.EVENT_TYPE_UNSPECIFIED),
    ]
    response = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events))
    assert (response.accepted, response.duplicates) == (2, 1)
    assert [(e.index, e.event_id) for e in response.errors] == [(3, "bad-user"), (4, "bad-type")]
    assert "user_id" in response.errors[0].reason and "UNSPECIFIED" in response.errors[1].reason

    # The same ids again, in a later batch: duplicates, nothing stored or published twice.
    again = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events[:2]))
    assert (again.accepted, again.duplicates) == (0, 2)

    msgs, total = await stream_messages(nats_client, 2)
    assert total == 2
    assert [m.headers[MSG_ID_HEADER] for m in msgs] == ["e1", "e2"]
    assert msgs[0].subject == f"freshrec.events.accepted.click.{user_partition('u1')}"
    assert event_pb2.Event.FromString(msgs[1].data).item_id == "i2"


async def test_event_without_id_gets_a_deterministic_one(stub) -> None:
    e = event("u1", "i1", at=1_700_000_000)
    first = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[e]))
    retry = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[e]))
    assert (first.accepted, retry.duplicates) == (1, 1)
    assert derive_event_id(e) == derive_event_id(event("u1", "i1", at=1_700_000_000))
    assert derive_event_id(e) != derive_event_id(event("u1", "i2", at=1_700_000_000))


async def test_batch_over_the_limit_is_refused_whole(stub) -> None:
    events = [event("u", f"i{n}") for n in range(51)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit of 50" in caught.value.details()


async def test_client_stream_summarises_the_whole_stream(stub, nats_client) -> None:
    async def produce():  # type: ignore[no-untyped-def]
        for n in range(120):  # more than one internal batch of 50
            yield event("u", f"i{n}", event_id=f"s{n}")
        yield event("u", "x", event_id="s0")  # duplicate of the first
        yield event("u", "", event_id="no-item")

    response = await stub.IngestEventStream(produce())
    assert (response.accepted, response.duplicates) == (120, 1)
    assert [(e.index, e.event_id) for e in response.errors] == [(121, "no-item")]
    _, total = await stream_messages(nats_client, 120)
    assert total == 120


async def test_nats_raw_intake_and_dead_letters(ingestion, nats_client) -> None:
    js = nats_client.jetstream()
    await js.publish("freshrec.events.raw", event("u9", "i9", event_id="raw-1").SerializeToString())
    await js.publish("freshrec.events.raw", b"\xff\xff not a protobuf")
    await js.publish("freshrec.events.raw", event("u9", "", event_id="raw-bad").SerializeToString())
    msgs, _ = await stream_messages(nats_client, 1)
    assert msgs[0].headers[MSG_ID_HEADER] == "raw-1"

    dlq = await js.subscribe("freshrec.events.dlq", stream="FRESHREC_DLQ")
    dead = [await dlq.next_msg(timeout=10), await dlq.next_msg(timeout=10)]
    reasons = sorted(m.headers["Freshrec-Dlq-Reason"] for m in dead)
    assert reasons[0] == "item_id is empty"
    assert reasons[1].startswith("not a protobuf")


@pytest.mark.postgres
async def test_same_code_on_postgresql(nats_server, nats_client, tmp_path: Path, postgres_url: str) -> None:
    settings = service_settings(IngestionSettings, nats_server, tmp_path, database={"url": postgres_url})
    app = IngestionApp(settings)
    await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        events = [event("u", f"i{n}", event_id=f"pg{n}") for n in range(10)]
        first = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events))
        again = await stub.IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=events[5:] + [event("u", "z")])
        )
    assert (first.accepted, again.accepted, again.duplicates) == (10, 1, 5)
    _, total = await stream_messages(nats_client, 11)
    assert total == 11
    await app.stop()
