"""Building blocks of gRPC server interceptors: wrap a method's behaviour, or refuse a call.

freshrec's RPCs all answer with one message (unary-unary and stream-unary); response-streaming
methods (reflection, health Watch) pass through the wrappers unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

Behaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
#: A method's handler, any request and response type (the stubs' class is generic; grpc's is not).
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
#: The ``continuation`` a server interceptor's ``intercept_service`` is given.
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"


def wrap_behaviour(handler: Handler, wrap: Callable[[Behaviour], Behaviour]) -> Handler:
    """The handler with its unary-response behaviour wrapped; other kinds are returned as they are."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            # On an aio server the behaviour is a coroutine function of an aio context; the stubs
            # type the synchronous server's.
            wrap(handler.unary_unary),  # type: ignore[arg-type]
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary),  # type: ignore[arg-type]  # as above
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def refusal(handler: Handler | None, code: grpc.StatusCode, details: str) -> Handler:
    """A handler of the same kind that answers every call with ``code`` and ``details``."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, details)

    if handler is not None and handler.request_streaming and not handler.response_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler is not None and handler.request_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
