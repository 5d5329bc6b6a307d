"""Refusing a request: ``RequestError`` carries the gRPC status and a reason a client can act on.

A service's ``validation.py`` (and its request path) raise it from plain functions, which tests
can drive without gRPC; ``answers`` around a servicer method sends it as the call's status. The
id and k checks the feature and inference services both make live here, worded alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from functools import wraps
from typing import Any, TypeVar

import grpc

from shared.settings import RequestLimits

#: Items in an answer when a request leaves k at 0.
DEFAULT_K = 10

Request = TypeVar("Request")
Response = TypeVar("Response")
Method = Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]


class RequestError(Exception):
    """A request that gets ``code`` and ``reason`` instead of an answer."""

    def __init__(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def answers(method: Method[Request, Response]) -> Method[Request, Response]:
    """The RPC method, with a ``RequestError`` it raises sent as the call's status and reason."""

    @wraps(method)
    async def rpc(self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]) -> Response:
        try:
            return await method(self, request, context)
        except RequestError as error:
            await context.abort(error.code, error.reason)
            raise  # abort raises; this line only tells type checkers so

    return rpc


# -- checks both read services make, worded alike -------------------------------------------------
def check_id(value: str, name: str, limits: RequestLimits) -> None:
    if not value:
        raise RequestError(f"{name} is empty")
    if len(value) > limits.max_id_length:
        raise RequestError(f"{name} is longer than {limits.max_id_length}")


def check_ids(values: Iterable[str], name: str, limits: RequestLimits) -> None:
    values = list(values)
    if len(values) > limits.max_ids_per_request:
        raise RequestError(f"{name} has {len(values)} ids; at most {limits.max_ids_per_request} per call")
    for value in values:
        if not value:
            raise RequestError(f"{name} has an empty id")
        if len(value) > limits.max_id_length:
            raise RequestError(f"{name} has an id longer than {limits.max_id_length}")


def check_k(k: int, limits: RequestLimits) -> int:
    """The number of items to answer with: ``k``, or the default when the client left it 0."""
    if k > limits.max_k:
        raise RequestError(f"k is {k}; at most {limits.max_k} items per call")
    return k or DEFAULT_K
