"""forever and retry: failures are logged and retried after the pause, a cancellation stops them at
once, and retry gives up on errors it was not told to retry."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shared.supervise import forever, retry

log = logging.getLogger("tests.supervise")


async def test_forever_outlives_failures_and_stops_when_cancelled(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    three = asyncio.Event()

    async def step() -> None:
        calls.append(len(calls))
        if len(calls) >= 3:
            three.set()
        if len(calls) % 2:
            raise RuntimeError("odd call")

    task = asyncio.create_task(forever(step, logger=log, failed="step failed", every_s=0.01, retry_s=0.02))
    await asyncio.wait_for(three.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    failures = [r for r in caplog.records if r.name == "tests.supervise"]
    assert failures and all(r.getMessage() == "step failed" and r.exc_info for r in failures)


async def test_retry_returns_what_the_attempt_returns_once_it_works(caplog: pytest.LogCaptureFixture) -> None:
    attempts: list[int] = []

    async def attempt() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("not yet")
        return "up"

    with caplog.at_level(logging.DEBUG, logger="tests.supervise"):
        assert await retry(attempt, logger=log, failed="peer down", retry_s=0.01, level=logging.DEBUG) == "up"
    assert len(attempts) == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "tests.supervise"]
    assert messages == ["peer down: not yet"] * 2


async def test_retry_lets_other_errors_through() -> None:
    async def attempt() -> None:
        raise ValueError("a bug, not a wait")

    with pytest.raises(ValueError):
        await retry(attempt, logger=log, failed="x", retry_s=0.01, errors=(ConnectionError,))


async def test_retry_retries_only_what_retryable_accepts() -> None:
    attempts: list[str] = []

    async def attempt() -> None:
        attempts.append("x")
        raise ConnectionError("refused" if len(attempts) == 3 else "not yet")

    with pytest.raises(ConnectionError, match="refused"):
        await retry(attempt, logger=log, failed="x", retry_s=0.01, retryable=lambda e: str(e) == "not yet")
    assert len(attempts) == 3
