"""Building blocks of gRPC server interceptors: wrap a method's behaviour, or refuse a call.

freshrec's RPCs all answer with one message (unary-unary and stream-unary); response-streaming
methods (reflection, health Watch) pass through the wrappers unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def wrap_behaviour(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Behaviour], Behaviour]
) -> grpc.RpcMethodHandler:
    """The handler with its unary-response behaviour wrapped; other kinds are returned as they are."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def refusal(
    handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind that answers every call with ``code`` and ``details``."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    if handler is not None and handler.request_streaming and not handler.response_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler is not None and handler.request_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
