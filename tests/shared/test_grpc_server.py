"""The shared server bootstrap's stop: it never hangs on a task that ignores its cancellation."""

from __future__ import annotations

import asyncio
import time

from shared.grpc_server import TASK_STOP_TIMEOUT_S, start_grpc_server
from shared.settings import GrpcSettings


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
