"""The gRPC entry points on real parts: gRPC in, SQL event log (SQLite, and PostgreSQL when marked),
JetStream out."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from freshrec.v1 import event_pb2, ingestion_pb2
from services.ingestion.publisher import PUBLISHER_HEALTH
from services.ingestion.validation import derive_event_id
from shared.nats import MSG_ID_HEADER, user_partition
from tests.conftest import eventually
from tests.factories import event
from tests.harness import NatsServer
from tests.ingestion.conftest import AppFactory, stub_for
from tests.ingestion.helpers import duplicated, stream_events, stream_ids


async def test_accepts_dedups_and_rejects_per_event(
    db_url: str, make_app: AppFactory, nats_server: NatsServer
) -> None:
    app = await make_app(database={"url": db_url})
    events = [
        event("u1", "i1", event_id="e1"),
        event("u1", "i2", event_id="e2"),
        event("u1", "i2", event_id="e2"),  # repeated within the batch
        event("", "i3", event_id="bad-user"),
        event("u2", "i4", event_id="bad-type", type=event_pb2.EVENT_TYPE_UNSPECIFIED),
        event("u3", "i5", event_id="e3", type=event_pb2.EVENT_TYPE_PURCHASE),
    ]
    channel, stub = stub_for(app)
    async with channel:
        response = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events))
        assert (response.accepted, response.duplicates) == (3, 1)
        assert [(e.index, e.event_id, e.reason) for e in response.errors] == [
            (3, "bad-user", "user_id is empty"),
            (4, "bad-type", "type is EVENT_TYPE_UNSPECIFIED"),
        ]
        # The same ids again in a later batch: duplicates, nothing stored or published twice.
        again = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events[:2] + events[5:]))
        assert (again.accepted, again.duplicates, len(again.errors)) == (0, 3, 0)

    published = await stream_events(nats_server.url)
    assert [h[MSG_ID_HEADER] for _, _, h in published] == ["e1", "e2", "e3"]
    subject, first, _ = published[0]
    assert subject == f"freshrec.events.accepted.click.{user_partition('u1')}"
    assert first == events[0]  # the payload is the event as sent
    assert published[2][0] == f"freshrec.events.accepted.purchase.{user_partition('u3')}"


async def test_an_event_without_id_gets_a_deterministic_one(
    make_app: AppFactory, nats_server: NatsServer
) -> None:
    app = await make_app()
    e = event("u1", "i1", at=1_700_000_000)
    channel, stub = stub_for(app)
    async with channel:
        first = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[e]))
        retry = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[e]))
    assert (first.accepted, retry.accepted, retry.duplicates) == (1, 0, 1)
    published = await stream_events(nats_server.url)
    assert len(published) == 1
    _, stored, headers = published[0]
    assert stored.event_id == headers[MSG_ID_HEADER] == derive_event_id(e)


async def test_a_batch_over_the_limit_is_refused_whole(make_app: AppFactory, nats_server: NatsServer) -> None:
    app = await make_app(max_batch=50)
    channel, stub = stub_for(app)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.IngestEvents(
                ingestion_pb2.IngestEventsRequest(events=[event("u", f"i{n}") for n in range(51)])
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "limit of 50" in caught.value.details()
        ok = await stub.IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=[event("u", f"i{n}") for n in range(50)])
        )
        assert ok.accepted == 50
    assert len(await stream_ids(nats_server.url)) == 50


async def test_the_client_stream_summarises_the_whole_stream(
    make_app: AppFactory, nats_server: NatsServer
) -> None:
    app = await make_app(max_batch=50)

    async def produce():  # type: ignore[no-untyped-def]
        for n in range(120):  # more than two internal batches of 50
            yield event("u", f"i{n}", event_id=f"s{n}")
        yield event("u", "x", event_id="s0")  # duplicate of the first
        yield event("u", "", event_id="no-item")

    channel, stub = stub_for(app)
    async with channel:
        response = await stub.IngestEventStream(produce())
    assert (response.accepted, response.duplicates) == (120, 1)
    assert [(e.index, e.event_id, e.reason) for e in response.errors] == [
        (121, "no-item", "item_id is empty")
    ]
    ids = await stream_ids(nats_server.url)
    assert ids == [f"s{n}" for n in range(120)]


async def test_dedup_holds_across_restarts(
    db_url: str, make_app: AppFactory, nats_server: NatsServer
) -> None:
    events = [event("u", f"i{n}", event_id=f"r{n}") for n in range(20)]
    first = await make_app(database={"url": db_url}, replica_name="r")
    channel, stub = stub_for(first)
    async with channel:
        assert (await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events))).accepted == 20
    await first.stop()

    second = await make_app(database={"url": db_url}, replica_name="r")
    channel, stub = stub_for(second)
    async with channel:
        retry = await stub.IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=events[10:] + [event("u", "new")])
        )
    assert (retry.accepted, retry.duplicates) == (1, 10)
    ids = await stream_ids(nats_server.url)
    assert len(ids) == 21 and not duplicated(ids)


async def test_concurrent_requests_share_commits_and_lose_nothing(
    make_app: AppFactory, nats_server: NatsServer
) -> None:
    app = await make_app()
    channel, stub = stub_for(app)
    async with channel:

        async def producer(p: int) -> int:
            accepted = 0
            for b in range(5):
                batch = [event(f"u{p}", f"i{n}", event_id=f"p{p}-{b}-{n}") for n in range(100)]
                # Every batch also repeats an id of another producer's batch: exactly one of them wins.
                batch.append(event("u", "shared", event_id=f"shared-{b}"))
                response = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=batch))
                accepted += response.accepted
            return accepted

        totals = await asyncio.gather(*(producer(p) for p in range(6)))
    assert sum(totals) == 6 * 5 * 100 + 5
    ids = await stream_ids(nats_server.url)
    assert len(ids) == 3005 and not duplicated(ids)


async def test_health_has_the_server_and_the_publisher(make_app: AppFactory) -> None:
    app = await make_app()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status(service: str) -> int:
            return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

        assert await status("") == health_pb2.HealthCheckResponse.SERVING
        assert await status("freshrec.v1.IngestionService") == health_pb2.HealthCheckResponse.SERVING

        async def publishing() -> bool:
            return await status(PUBLISHER_HEALTH) == health_pb2.HealthCheckResponse.SERVING

        await eventually(publishing, what="the publisher health to be SERVING")
