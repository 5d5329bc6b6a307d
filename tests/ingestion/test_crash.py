"""Kill the ingestion process between commit and publish, restart it, and find each event exactly
once in the stream, also when the restart comes after JetStream's duplicate window has closed.

No hook in the service: the nats-server is SIGSTOPped, so commits succeed while publishes hang
unanswered in the socket; the service (a real ``python -m services.ingestion`` subprocess) is
SIGKILLed; the nats-server resumes and stores whatever reached it; a new process starts on the
same database.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from freshrec.v1 import ingestion_pb2, ingestion_pb2_grpc
from tests.conftest import eventually
from tests.factories import event
from tests.harness import NatsServer
from tests.ingestion.helpers import (
    IngestionProcess,
    committed_ids,
    duplicated,
    frozen,
    metric,
    stream_ids,
    unpublished_count,
)

WINDOW_S = 2.0


async def ingest(address: str, events: list, timeout_s: float = 30) -> ingestion_pb2.IngestEventsResponse:  # type: ignore[type-arg]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        return await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events), timeout=timeout_s)


@pytest.mark.slow
@pytest.mark.parametrize("restart_after_window", [False, True], ids=["within-window", "after-window"])
async def test_killed_between_commit_and_publish(
    nats_server: NatsServer, tmp_path: Path, restart_after_window: bool
) -> None:
    db = tmp_path / "ingestion.db"
    settings = {
        "duplicate_window_s": str(WINDOW_S),
        "publish_timeout_s": "60",  # the request waits for its acks until it is killed
        "reconcile_clock_skew_s": "1",
    }
    first = IngestionProcess(nats_server, db, tmp_path / "first.log", **settings)
    await asyncio.to_thread(first.start)
    before = [event("u", f"i{n}", event_id=f"before-{n}") for n in range(20)]
    assert (await ingest(first.address, before)).accepted == 20

    stuck = [event(f"u{n % 5}", f"i{n}", event_id=f"stuck-{n}") for n in range(300)]
    with frozen(nats_server):
        request = asyncio.create_task(ingest(first.address, stuck, timeout_s=120))

        async def committed() -> bool:
            return len(committed_ids(db)) == 320

        await eventually(committed, what="the stuck batch to be committed")
        first.kill()  # committed, published into a socket nobody reads, never marked published
        killed_at = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError):
            await request
    assert unpublished_count(db) == 300

    async def landed() -> list[str]:
        # Whatever reached the server before the kill is stored once it resumes.
        ids = await stream_ids(nats_server.url)
        return ids if len(ids) > 20 else []

    in_stream_before_restart = set(await eventually(landed, what="the stuck publishes to land")) - {
        e.event_id for e in before
    }
    if restart_after_window:
        # Let JetStream's duplicate window close: now only the reconciliation can prevent copies.
        while time.monotonic() < killed_at + WINDOW_S + 1.0:
            await asyncio.sleep(0.1)

    second = IngestionProcess(nats_server, db, tmp_path / "second.log", **settings)
    await asyncio.to_thread(second.start)
    try:

        async def drained() -> bool:
            return unpublished_count(db) == 0

        await eventually(drained, what="the outbox to drain")
        ids = await stream_ids(nats_server.url)
        assert not duplicated(ids), f"published twice: {list(duplicated(ids))[:5]}"
        assert sorted(ids) == sorted(e.event_id for e in before + stuck)
        text = second.metrics()
        reconciled = metric(text, "freshrec_ingestion_reconciled_total")
        relayed = metric(text, "freshrec_ingestion_events_published_total", path="relay")
        if restart_after_window:
            # Stuck events already in the stream were found there, the others published: no copies.
            seen = len(in_stream_before_restart)
            summary = f"reconciled {reconciled}, relayed {relayed}, seen before the restart {seen}"
            assert reconciled >= seen > 0, summary
            assert reconciled + relayed == 300, summary
        # A retry of the killed request is answered with duplicates only.
        retry = await ingest(second.address, stuck)
        assert (retry.accepted, retry.duplicates) == (0, 300)
        assert len(await stream_ids(nats_server.url)) == 320
    finally:
        second.stop()
