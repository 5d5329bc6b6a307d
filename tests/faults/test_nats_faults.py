"""NATS faults: the server SIGKILLed and restarted, and frozen longer than the consumers' ack wait."""

from __future__ import annotations

import asyncio
import signal

import pytest

from cli.stack import Stack
from tests.faults.harness import fault_stack, run_scenario

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture
def stack(tmp_path):  # type: ignore[no-untyped-def]
    s = fault_stack(tmp_path)
    s.start()
    yield s
    s.stop()


async def test_nats_killed_and_restarted_twice(stack: Stack) -> None:
    async def inject(s: Stack) -> None:
        for _ in range(2):
            s.nats.kill()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(s.nats.start)
            await asyncio.sleep(2.0)

    verdict = await run_scenario(stack, "natskill", inject)
    print(verdict.row(), verdict.notes)
    assert verdict.ok, verdict.notes
    assert verdict.acknowledged > 0


async def test_nats_frozen_longer_than_ack_wait(stack: Stack) -> None:
    async def inject(s: Stack) -> None:
        assert s.nats.process is not None
        s.nats.process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(35.0)  # longer than the feature consumer's 30 s ack wait
        s.nats.process.send_signal(signal.SIGCONT)

    verdict = await run_scenario(stack, "natsstop", inject)
    print(verdict.row(), verdict.notes)
    assert verdict.ok, verdict.notes
