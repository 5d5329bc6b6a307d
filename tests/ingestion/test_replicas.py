"""Several ingestion replicas on one database: each publishes its own outbox, and the outbox of a
replica that died is taken over by a live one, published once."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from freshrec.v1 import ingestion_pb2, ingestion_pb2_grpc
from tests.conftest import eventually
from tests.factories import event
from tests.harness import NatsServer
from tests.ingestion.conftest import AppFactory, stub_for
from tests.ingestion.helpers import (
    IngestionProcess,
    committed_ids,
    duplicated,
    frozen,
    stream_ids,
    unpublished_count,
)

LEASE_S = 2.0


def owners_of_unpublished(db: Path) -> set[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
        return {row[0] for row in connection.execute("SELECT DISTINCT owner FROM events WHERE published = 0")}


@pytest.mark.slow
async def test_a_live_replica_takes_over_the_outbox_of_a_dead_one(
    make_app: AppFactory, nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "ingestion.db"
    survivor = await make_app(database={"url": f"sqlite:///{db}"}, replica_name="b", replica_lease_s=LEASE_S)
    doomed = IngestionProcess(
        nats_server,
        db,
        tmp_path / "a.log",
        replica_name="a",
        replica_lease_s=str(LEASE_S),
        publish_timeout_s="60",
    )
    await asyncio.to_thread(doomed.start)
    try:
        async with grpc.aio.insecure_channel(doomed.address) as channel:
            stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
            ok = await stub.IngestEvents(
                ingestion_pb2.IngestEventsRequest(
                    events=[event("u", f"i{n}", event_id=f"a-{n}") for n in range(10)]
                )
            )
            assert ok.accepted == 10
            stuck = [event("u", f"s{n}", event_id=f"stuck-{n}") for n in range(100)]
            with frozen(nats_server):

                async def call() -> ingestion_pb2.IngestEventsResponse:
                    return await stub.IngestEvents(
                        ingestion_pb2.IngestEventsRequest(events=stuck), timeout=120
                    )

                request = asyncio.create_task(call())

                async def committed() -> bool:
                    return len(committed_ids(db)) == 110

                await eventually(committed, what="the stuck batch to be committed")
                owners = owners_of_unpublished(db)
                assert len(owners) == 1 and survivor.replica_id not in owners
                # While the owner lives (its heartbeat goes on), nobody else touches its outbox.
                until = time.monotonic() + 2 * LEASE_S
                while time.monotonic() < until:
                    assert owners_of_unpublished(db) == owners
                    await asyncio.sleep(0.2)
                doomed.kill()
                with pytest.raises(grpc.aio.AioRpcError):
                    await request
    finally:
        doomed.kill()

    async def taken_over_and_drained() -> bool:
        return unpublished_count(db) == 0

    await eventually(
        taken_over_and_drained, timeout_s=30, what="the survivor to publish the dead replica's outbox"
    )
    ids = await stream_ids(nats_server.url)
    assert not duplicated(ids)
    assert sorted(ids) == sorted([f"a-{n}" for n in range(10)] + [f"stuck-{n}" for n in range(100)])

    # The survivor keeps working, and its own events do not wait for anyone.
    channel, stub = stub_for(survivor)
    async with channel:
        more = await stub.IngestEvents(
            ingestion_pb2.IngestEventsRequest(
                events=[event("u", f"b{n}", event_id=f"b-{n}") for n in range(5)]
            )
        )
    assert more.accepted == 5
    assert len(await stream_ids(nats_server.url)) == 115


async def test_replicas_side_by_side_split_nothing_twice(
    make_app: AppFactory, nats_server: NatsServer
) -> None:
    first = await make_app(replica_name="one")
    second = await make_app(replica_name="two")
    shared = [event("u", f"i{n}", event_id=f"shared-{n}") for n in range(200)]

    async def send(app, events):  # type: ignore[no-untyped-def]
        channel, stub = stub_for(app)
        async with channel:
            return await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events))

    # Both replicas receive the same events at once (a producer retrying against another replica).
    a, b = await asyncio.gather(send(first, shared), send(second, shared))
    assert a.accepted + b.accepted == 200
    assert a.duplicates + b.duplicates == 200

    async def all_there() -> list[str] | None:
        ids = await stream_ids(nats_server.url)
        return ids if len(ids) >= 200 else None

    ids = await eventually(all_there, what="200 events in the stream")
    assert not duplicated(ids) and len(ids) == 200
