"""The outbox: ingestion keeps accepting while NATS is down, says so, and publishes everything,
once and in order, when NATS is back."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from freshrec.v1 import ingestion_pb2
from services.ingestion.publisher import PUBLISHER_HEALTH
from tests.conftest import eventually
from tests.factories import event
from tests.harness import NatsServer
from tests.ingestion.conftest import AppFactory, stub_for
from tests.ingestion.helpers import duplicated, stream_ids

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def batch(prefix: str, n: int, size: int) -> list:  # type: ignore[type-arg]
    return [event(f"u{k % 7}", f"i{k}", event_id=f"{prefix}-{n}-{k}") for k in range(size)]


async def health_status(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service)
        )
    return int(response.status)


def gauge(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def wait_for_stream(url: str, n: int, timeout_s: float = 60.0) -> list[str]:
    async def enough() -> list[str] | None:
        ids = await stream_ids(url)
        return ids if len(ids) >= n else None

    ids: list[str] = await eventually(enough, timeout_s=timeout_s, what=f"{n} events in the stream")
    return ids


async def test_nats_down_accepts_reports_and_drains_in_order(
    db_url: str, make_app: AppFactory, nats_server: NatsServer
) -> None:
    app = await make_app(database={"url": db_url}, nats={"url": nats_server.url, "reconnect_wait_s": 0.2})
    channel, stub = stub_for(app)
    async with channel:
        before = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=batch("before", 0, 10)))
        assert before.accepted == 10

        async def publishing() -> bool:
            return await health_status(app.port, PUBLISHER_HEALTH) == SERVING

        await eventually(publishing, what="the publisher health to be SERVING")
        nats_server.stop()

        async def not_publishing() -> bool:
            return await health_status(app.port, PUBLISHER_HEALTH) == NOT_SERVING

        await eventually(not_publishing, what="the publisher health to turn NOT_SERVING")
        sent: list[str] = []
        for n in range(5):
            events = batch("down", n, 40)
            started = time.monotonic()
            response = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events))
            assert response.accepted == 40  # accepted: the SQL log is durable
            assert time.monotonic() - started < 5  # and not held up by the missing NATS
            sent += [e.event_id for e in events]
        assert await health_status(app.port, "") == SERVING  # the server itself keeps serving
        assert await health_status(app.port, "freshrec.v1.IngestionService") == SERVING
        assert gauge("freshrec_ingestion_nats_connected") == 0
        assert gauge("freshrec_ingestion_publisher_serving") == 0

        async def backlog() -> bool:
            return gauge("freshrec_ingestion_outbox_backlog") >= 200

        await eventually(backlog, what="the outbox backlog metric to count the waiting events")

        nats_server.start()
        ids = await wait_for_stream(nats_server.url, 210)
        assert ids == [e.event_id for e in batch("before", 0, 10)] + sent  # in commit order, once each
        await eventually(publishing, what="the publisher health to recover")

        async def drained() -> bool:
            return gauge("freshrec_ingestion_outbox_backlog") == 0

        await eventually(drained, what="the backlog metric to return to 0")
        after = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=batch("after", 0, 5)))
        assert after.accepted == 5
    assert len(await wait_for_stream(nats_server.url, 215)) == 215


@pytest.mark.slow
async def test_nats_killed_and_restarted_under_load(
    db_url: str, make_app: AppFactory, nats_server: NatsServer
) -> None:
    app = await make_app(
        database={"url": db_url},
        nats={"url": nats_server.url, "reconnect_wait_s": 0.2},
        publish_timeout_s=2.0,
    )
    acknowledged: list[str] = []
    stop = asyncio.Event()

    async def producer(p: int) -> None:
        channel, stub = stub_for(app)
        async with channel:
            n = 0
            while not stop.is_set():
                events = batch(f"p{p}", n, 50)
                response = await stub.IngestEvents(
                    ingestion_pb2.IngestEventsRequest(events=events), timeout=30
                )
                assert response.accepted == 50 and not response.errors
                acknowledged.extend(e.event_id for e in events)
                n += 1

    workers = [asyncio.create_task(producer(p)) for p in range(3)]
    await eventually(lambda: asyncio.sleep(0, len(acknowledged) > 1000), what="load to build up")
    nats_server.kill()  # SIGKILL: in-flight publishes are lost with the connection
    down_at = len(acknowledged)
    await eventually(
        lambda: asyncio.sleep(0, len(acknowledged) > down_at + 2000), what="accepting while down"
    )
    nats_server.start()
    back_at = len(acknowledged)
    await eventually(
        lambda: asyncio.sleep(0, len(acknowledged) > back_at + 2000), what="load after the restart"
    )
    stop.set()
    await asyncio.gather(*workers)

    ids = await wait_for_stream(nats_server.url, len(acknowledged))
    assert not duplicated(ids)
    assert set(ids) == set(acknowledged)  # zero lost, zero duplicated


async def test_starts_and_accepts_while_nats_is_down(make_app: AppFactory, nats_server: NatsServer) -> None:
    nats_server.stop()
    started = time.monotonic()
    app = await make_app(nats={"url": nats_server.url, "reconnect_wait_s": 0.2, "connect_timeout_s": 0.5})
    assert time.monotonic() - started < 10
    assert await health_status(app.port, "") == SERVING
    assert await health_status(app.port, PUBLISHER_HEALTH) == NOT_SERVING
    channel, stub = stub_for(app)
    async with channel:
        response = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=batch("early", 0, 30)))
    assert response.accepted == 30
    nats_server.start()
    ids = await wait_for_stream(nats_server.url, 30)
    assert ids == [e.event_id for e in batch("early", 0, 30)]

    async def publishing() -> bool:
        return await health_status(app.port, PUBLISHER_HEALTH) == SERVING

    await eventually(publishing, what="the publisher health to turn SERVING once NATS is up")
