"""Accepted events carry their user's partition in the subject, so consumers can split users."""

from __future__ import annotations

import zlib
from pathlib import Path

import grpc
from nats.js.api import ConsumerConfig, DeliverPolicy

from freshrec.v1 import event_pb2, ingestion_pb2, ingestion_pb2_grpc
from services.ingestion.server import IngestionApp
from services.ingestion.settings import IngestionSettings
from shared.nats import (
    ACCEPTED_SUBJECTS,
    EVENT_PARTITIONS,
    EVENTS_STREAM,
    accepted_subject,
    partition_filter_subjects,
    user_partition,
)
from tests.conftest import eventually, service_settings
from tests.factories import event


def test_partition_is_crc32_of_the_user_id() -> None:
    # The documented function, so a producer in another language computes the same.
    assert user_partition("alice") == zlib.crc32(b"alice") % EVENT_PARTITIONS
    assert user_partition("ünï") == zlib.crc32("ünï".encode()) % EVENT_PARTITIONS
    p = user_partition("alice")
    assert accepted_subject("EVENT_TYPE_ADD_TO_CART", "alice") == f"freshrec.events.accepted.add_to_cart.{p}"


def test_replica_filters_cover_every_partition_once() -> None:
    assert partition_filter_subjects(0, 1) == [ACCEPTED_SUBJECTS]
    for replicas in (2, 3, 7, EVENT_PARTITIONS):
        owned = [f.rsplit(".", 1)[1] for r in range(replicas) for f in partition_filter_subjects(r, replicas)]
        assert sorted(map(int, owned)) == list(range(EVENT_PARTITIONS))


async def test_ingestion_publishes_on_the_partitioned_subject(
    nats_server, nats_client, tmp_path: Path
) -> None:
    app = IngestionApp(service_settings(IngestionSettings, nats_server, tmp_path))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
            events = [
                event(f"user{n}", "i1", event_id=f"e{n}", type=event_pb2.EVENT_TYPE_PURCHASE)
                for n in range(5)
            ]
            response = await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events))
            assert response.accepted == 5
        js = nats_client.jetstream()
        sub = await js.subscribe(
            ACCEPTED_SUBJECTS, stream=EVENTS_STREAM, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        )
        seen: dict[str, str] = {}

        async def all_seen() -> bool:
            try:
                msg = await sub.next_msg(timeout=0.2)
            except Exception:
                return False
            e = event_pb2.Event.FromString(msg.data)
            seen[e.user_id] = msg.subject
            return len(seen) == 5

        await eventually(all_seen, what="five accepted events")
        await sub.unsubscribe()
        assert seen == {f"user{n}": accepted_subject("EVENT_TYPE_PURCHASE", f"user{n}") for n in range(5)}
    finally:
        await app.stop()
