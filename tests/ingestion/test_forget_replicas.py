"""A forget request waits for every live replica of a service, on real parts: ingestion's app
(gRPC, SQLite, its recorder), a real nats-server and two real ForgetWorker replicas of an
inference-like service whose share of the work a test controls (the handler is the only stand-in).
A replica that stopped for good stops holding the request up once JetStream has removed its
consumer (its inactive threshold, small here)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from freshrec.v1 import ingestion_pb2
from shared.forget import ForgetWorker, live_replicas
from tests.conftest import eventually
from tests.factories import event
from tests.ingestion.conftest import AppFactory, stub_for

INACTIVE_S = 1.0
DONE = ingestion_pb2.FORGET_STATE_DONE
PENDING = ingestion_pb2.FORGET_STATE_PENDING


def settings(nats_url: str) -> dict[str, Any]:
    return {
        "forget": {
            "hash_key": "k",
            "settle_s": 0.0,
            "services": ["ingestion", "inference"],
            "recheck_s": 0.2,
        },
        "nats": {"url": nats_url, "forget_inactive_s": INACTIVE_S},
    }


class Replica:
    """One inference-like replica: a real ForgetWorker whose handler finishes when released."""

    def __init__(self, js: Any, name: str, *, ack_wait_s: float = 30.0) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.worker = ForgetWorker(
            js,
            service="inference",
            replica=name,
            durable=f"forget-inference-{name}",
            handle=self._handle,
            retry_s=0.2,
            ack_wait_s=ack_wait_s,
            inactive_s=INACTIVE_S,
        )
        self.task: asyncio.Task[None] | None = None

    async def _handle(self, task: ingestion_pb2.ForgetTask) -> str:
        self.started.set()
        await self.release.wait()
        return f"{self.worker.replica}: dropped"

    def start(self) -> None:
        self.task = asyncio.create_task(self.worker.run())

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def replicas(nats_client: Any) -> AsyncIterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(name: str, **kwargs: Any) -> Replica:
        replica = Replica(nats_client.jetstream(), name, **kwargs)
        replica.start()
        made.append(replica)
        return replica

    yield make
    for replica in made:
        if replica.task is not None and not replica.task.done():
            await replica.stop()


def entries(status: ingestion_pb2.GetForgetStatusResponse) -> set[tuple[str, str, int]]:
    return {(p.service, p.replica, p.state) for p in status.progress if p.service == "inference"}


async def request_with_two_replicas(
    make_app: AppFactory, nats_client: Any, replicas: Callable[..., Replica], **b_kwargs: Any
) -> tuple[Any, Any, str, Replica, Replica]:
    app = await make_app(**settings(nats_client.connected_url.geturl()))
    a, b = replicas("a"), replicas("b", **b_kwargs)

    async def both_live() -> bool:
        names = {r.replica for r in await live_replicas(nats_client.jetstream()) if r.service == "inference"}
        return names == {"a", "b"}

    await eventually(both_live, what="both replicas' consumers")
    channel, stub = stub_for(app)
    await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[event("alice", "i1", event_id="a1")]))
    request_id = (await stub.ForgetUser(ingestion_pb2.ForgetUserRequest(user_id="alice"))).request_id
    a.release.set()  # a is quick; b is slow

    async def a_done() -> ingestion_pb2.GetForgetStatusResponse | None:
        s = await stub.GetForgetStatus(ingestion_pb2.GetForgetStatusRequest(request_id=request_id))
        return s if ("inference", "a", DONE) in entries(s) else None

    status = await eventually(a_done, what="replica a's report")
    assert not status.done
    assert entries(status) == {("inference", "a", DONE), ("inference", "b", PENDING)}
    await asyncio.wait_for(b.started.wait(), 10.0)
    return channel, stub, request_id, a, b


async def test_the_request_waits_for_a_slow_replica(
    make_app: AppFactory, nats_client: Any, replicas: Callable[..., Replica]
) -> None:
    channel, stub, request_id, _, b = await request_with_two_replicas(make_app, nats_client, replicas)
    async with channel:
        # Longer than the inactive threshold and several rechecks: a replica with the task in hand
        # (still pulling, or working on it) keeps its consumer, and the request keeps waiting.
        await asyncio.sleep(3 * INACTIVE_S)
        s = await stub.GetForgetStatus(ingestion_pb2.GetForgetStatusRequest(request_id=request_id))
        assert not s.done and ("inference", "b", PENDING) in entries(s)

        b.release.set()

        async def done() -> ingestion_pb2.GetForgetStatusResponse | None:
            s = await stub.GetForgetStatus(ingestion_pb2.GetForgetStatusRequest(request_id=request_id))
            return s if s.done else None

        final = await eventually(done, what="the request complete once b reported")
        assert entries(final) == {("inference", "a", DONE), ("inference", "b", DONE)}
        assert final.completed_at.ToMicroseconds() >= max(p.done_at.ToMicroseconds() for p in final.progress)


async def test_a_replica_gone_for_good_stops_blocking_once_its_consumer_expires(
    make_app: AppFactory, nats_client: Any, replicas: Callable[..., Replica]
) -> None:
    channel, stub, request_id, _, b = await request_with_two_replicas(
        make_app, nats_client, replicas, ack_wait_s=1.0
    )
    async with channel:
        await b.stop()  # dies with the task in hand, never to report

        async def done() -> ingestion_pb2.GetForgetStatusResponse | None:
            s = await stub.GetForgetStatus(ingestion_pb2.GetForgetStatusRequest(request_id=request_id))
            return s if s.done else None

        final = await eventually(done, timeout_s=30.0, what="the request complete without b")
        assert entries(final) == {("inference", "a", DONE)}
        assert {r.replica for r in await live_replicas(nats_client.jetstream())} == {None, "a"}
