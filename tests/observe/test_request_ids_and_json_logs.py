"""Structured logs: every RPC's log lines carry its request id (the caller's x-request-id, or a new
one returned in the trailing metadata), also from worker threads; event ids and model versions
appear where code sets them. On a real gRPC server from the shared bootstrap."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from shared.grpc_server import RunningServer, start_grpc_server
from shared.logs import ContextFilter, JsonFormatter, PlainFormatter, log_context
from shared.settings import GrpcSettings

logger = logging.getLogger("freshrec.test.observe")


async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    logger.info("handling %s", request.decode())
    await asyncio.to_thread(logger.info, "in a worker thread")
    with log_context(event_id="evt-7", model_version="v000003"):
        logger.info("about one event")
    return request


@pytest.fixture
def captured() -> Any:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter("test"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    def register(s: grpc.aio.Server) -> None:
        s.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(handle)}
                ),
            )
        )

    running = await start_grpc_server(GrpcSettings(host="127.0.0.1", port=0), ["test.Echo"], register)
    yield running
    await running.stop(1)


async def say(port: int, text: str, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/test.Echo/Say")(text.encode(), metadata=metadata, timeout=5)
        await call
        trailing = await call.trailing_metadata()
    return dict(trailing or ())["x-request-id"]


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_the_callers_request_id_is_on_every_line_and_returned(
    server: RunningServer, captured: Any
) -> None:
    returned = await say(server.port, "hello", (("x-request-id", "req-42"),))
    assert returned == "req-42"
    logged = lines(captured)
    assert [entry["msg"] for entry in logged] == ["handling hello", "in a worker thread", "about one event"]
    assert all(entry["request_id"] == "req-42" for entry in logged)
    assert all(entry["service"] == "test" and entry["level"] == "info" for entry in logged)
    assert logged[2]["event_id"] == "evt-7" and logged[2]["model_version"] == "v000003"
    assert "event_id" not in logged[0] and "model_version" not in logged[1]


async def test_a_request_id_is_made_when_missing_or_unusable(server: RunningServer, captured: Any) -> None:
    first = await say(server.port, "a")
    second = await say(server.port, "b", (("x-request-id", "has spaces; and <angles>"),))
    third = await say(server.port, "c", (("x-request-id", "x" * 500),))
    assert len({first, second, third}) == 3
    assert all(len(r) == 32 and int(r, 16) >= 0 for r in (first, second, third))
    by_message = {entry["msg"]: entry["request_id"] for entry in lines(captured)}
    assert by_message["handling a"] == first and by_message["handling b"] == second
    # Outside any RPC nothing is attached.
    logger.info("outside")
    assert "request_id" not in lines(captured)[-1]


def test_plain_text_logs_show_the_context_too() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "served %s", ("it",), None)
    with log_context(model_version="v000009"):
        ContextFilter().filter(record)
    text = PlainFormatter("%(levelname)s %(message)s").format(record)
    assert text == "INFO served it [model_version=v000009]"
