"""Background work that outlives its failures: run a step forever, or retry an attempt until it works.

Every service keeps loops alive this way (relays, pollers, stream consumers, reconnections): a
failure is logged and the step runs again after a pause; only a cancellation stops it. The caller
passes its own logger, so the log lines keep the name of the module they come from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")


def raise_if_cancelling() -> None:
    """Raises CancelledError if this task was asked to stop.

    Python 3.11's ``asyncio.wait_for`` (inside every nats-py request) can swallow a cancellation
    that races with the answer it awaits; the task still counts the request, so loops check it,
    and a stop never waits forever on a loop that missed it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def forever(
    step: Callable[[], Awaitable[object]],
    *,
    logger: logging.Logger,
    failed: str,
    every_s: float = 0.0,
    retry_s: float | None = None,
) -> NoReturn:
    """Runs ``step`` until cancelled: again ``every_s`` after it returns, ``retry_s`` (by default
    ``every_s``) after it raises, the failure logged with its traceback as ``failed``."""
    while True:
        raise_if_cancelling()
        try:
            await step()
        except Exception:
            raise_if_cancelling()
            logger.exception(failed)
            await asyncio.sleep(every_s if retry_s is None else retry_s)
            continue
        await asyncio.sleep(every_s)


async def retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    logger: logging.Logger,
    failed: str,
    retry_s: float,
    errors: tuple[type[Exception], ...] = (Exception,),
    retryable: Callable[[Exception], bool] | None = None,
    level: int = logging.ERROR,
) -> T:
    """Awaits ``attempt`` until it returns, pausing ``retry_s`` after each failure; what it returns.

    Only ``errors`` (and of those, with ``retryable`` given, the ones it accepts) are retried;
    anything else propagates. A failure is logged as ``failed`` at ``level``: with its traceback at
    ERROR and above, with the exception's text below (an expected wait, such as for a peer that is
    not up yet).
    """
    while True:
        raise_if_cancelling()
        try:
            return await attempt()
        except errors as exc:
            raise_if_cancelling()
            if retryable is not None and not retryable(exc):
                raise
            if level >= logging.ERROR:
                logger.log(level, failed, exc_info=True)
            else:
                logger.log(level, "%s: %s", failed, exc)
            await asyncio.sleep(retry_s)
