"""The shared server bootstrap: a service app serves its servicer with health, runs its background
tasks and cleans up on stop, and the stop never hangs on a task that ignores its cancellation."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from freshrec.v1 import trainer_pb2, trainer_pb2_grpc
from shared.grpc_server import TASK_STOP_TIMEOUT_S, ServiceApp, full_service_name, start_grpc_server
from shared.settings import GrpcSettings, ServiceSettings


async def test_stop_does_not_wait_forever_for_a_stubborn_task() -> None:
    running = await start_grpc_server(GrpcSettings(host="127.0.0.1", port=0), [], lambda server: None)
    finished = asyncio.Event()

    async def stubborn() -> None:
        while not finished.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue  # what a loop does when a library swallows the cancellation

    running.tasks.append(asyncio.create_task(stubborn()))
    started = time.monotonic()
    await running.stop(grace_s=0.1)
    elapsed = time.monotonic() - started
    finished.set()
    await asyncio.sleep(0.1)
    assert TASK_STOP_TIMEOUT_S - 1 < elapsed < TASK_STOP_TIMEOUT_S + 3


async def test_a_service_app_serves_its_servicer_then_stops_its_tasks_and_cleans_up() -> None:
    settings = ServiceSettings(grpc=GrpcSettings(host="127.0.0.1", port=0, grace_s=1.0, drain_s=0.0))
    app = ServiceApp(settings)
    name = full_service_name(trainer_pb2.DESCRIPTOR, "TrainerService")
    background = asyncio.Event()
    cleaned: list[str] = []

    async def work() -> None:
        background.set()
        await asyncio.Event().wait()

    async def cleanup() -> None:
        cleaned.append("done")

    server = await app.serve(
        name,
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
        trainer_pb2_grpc.TrainerServiceServicer(),
        tasks={"work": work()},
        cleanups=[cleanup],
    )
    await asyncio.wait_for(background.wait(), 5)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as failed:  # the base servicer: reached, unimplemented
            await trainer_pb2_grpc.TrainerServiceStub(channel).GetTrainerStatus(
                trainer_pb2.GetTrainerStatusRequest()
            )
        assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    await app.stop()
    assert server.tasks[0].cancelled()
    assert cleaned == ["done"]
