"""SIGTERM to each service under load: in-flight RPCs complete, new ones get UNAVAILABLE, and the
process exits cleanly within its grace period."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from freshrec.v1 import (
    event_pb2,
    feature_pb2,
    feature_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from tests.faults.harness import FaultStack, restart

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(600)]

GRACE_S = 5.0


def one_event(n: int) -> event_pb2.Event:
    e = event_pb2.Event(event_id=f"term-{n}", user_id=f"term-u{n}", item_id=f"i{n % 10}")
    e.type = event_pb2.EVENT_TYPE_VIEW
    e.occurred_at.GetCurrentTime()
    return e


def call_for(service: str, channel: grpc.aio.Channel, n: int) -> Awaitable[Any]:
    if service == "ingestion":
        return ingestion_pb2_grpc.IngestionServiceStub(channel).IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=[one_event(n)]), timeout=30
        )
    if service == "feature":
        return feature_pb2_grpc.FeatureServiceStub(channel).GetUserFeatures(
            feature_pb2.GetUserFeaturesRequest(user_id=f"term-u{n}"), timeout=30
        )
    if service == "trainer":
        return trainer_pb2_grpc.TrainerServiceStub(channel).GetTrainerStatus(
            trainer_pb2.GetTrainerStatusRequest(), timeout=30
        )
    return inference_pb2_grpc.InferenceServiceStub(channel).Recommend(
        inference_pb2.RecommendRequest(user_id=f"term-u{n}", k=5), timeout=30
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):  # type: ignore[no-untyped-def]
    s = FaultStack(tmp_path_factory.mktemp("sigterm"))
    for service in s.services.values():
        service.env["FRESHREC_GRPC__GRACE_S"] = str(GRACE_S)
    s.start()
    yield s
    s.stop()


@pytest.mark.parametrize("service", ["ingestion", "feature", "trainer", "inference"])
async def test_sigterm_under_load(stack: FaultStack, service: str) -> None:
    address = stack.address(service)
    calls: list[tuple[float, str]] = []  # (start time, status code)
    stop = asyncio.Event()
    counter = iter(range(10**9))

    async def worker() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    await call_for(service, channel, next(counter))
                    calls.append((started, "OK"))
                except grpc.aio.AioRpcError as exc:
                    calls.append((started, exc.code().name))
                    await asyncio.sleep(0.05)

    # A client stream that is in flight when SIGTERM arrives and goes on sending after it.
    in_flight: Callable[[], Awaitable[Any]] | None = None
    if service == "ingestion":
        channel = grpc.aio.insecure_channel(address)

        async def stream_events():  # type: ignore[no-untyped-def]
            for n in range(40):
                yield one_event(10**8 + n)
                await asyncio.sleep(0.05)

        call = ingestion_pb2_grpc.IngestionServiceStub(channel).IngestEventStream(stream_events())

        async def finish() -> Any:
            try:
                return await call
            finally:
                await channel.close()

        in_flight = finish

    workers = [asyncio.create_task(worker()) for _ in range(16)]
    await asyncio.sleep(1.0)
    process = stack.services[service].process
    assert process is not None
    sigterm_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(process.wait, GRACE_S + 10)
    exit_s = time.monotonic() - sigterm_at
    await asyncio.sleep(0.5)  # calls after the exit: refused
    stop.set()
    await asyncio.gather(*workers)
    streamed = await in_flight() if in_flight else None
    await restart(stack, service)

    before = Counter(code for started, code in calls if started < sigterm_at)
    after = Counter(code for started, code in calls if started >= sigterm_at)
    print(service, "before SIGTERM", dict(before), "after", dict(after), f"exit {code} after {exit_s:.2f}s")
    assert code == 0, f"{service} exited with {code}"
    assert exit_s <= GRACE_S + 3.0, f"{service} took {exit_s:.1f}s to exit (grace {GRACE_S}s)"
    # Calls started before SIGTERM were served, or refused UNAVAILABLE if the server had not begun them.
    assert before["OK"] > 0 and set(before) <= {"OK", "UNAVAILABLE"}, before
    # New calls are refused. gRPC core answers CANCELLED instead of UNAVAILABLE for a call that reaches
    # the server in the instant it stops, before the application could take it (grpc/grpc#41785):
    # that one upstream exception is tolerated and reported, nothing else.
    assert after["UNAVAILABLE"] > 0 and set(after) <= {"UNAVAILABLE", "CANCELLED"}, after
    if streamed is not None:
        assert streamed.accepted == 40, "the in-flight stream was not completed"
