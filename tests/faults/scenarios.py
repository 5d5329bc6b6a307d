"""The fault scenarios, shared by the test suite (tests/faults) and bench/faults.py.

Each scenario injects its fault into a running stack while producers stream events; the harness
then drains the stack and classifies every event id.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cli.stack import Stack
from tests.faults.harness import FaultStack, Verdict, kill, restart, run_scenario

Inject = Callable[[Stack], Awaitable[None]]


async def nats_killed_twice(stack: Stack) -> None:
    """nats-server SIGKILLed and restarted twice mid-stream."""
    for _ in range(2):
        stack.nats.kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(stack.nats.start)
        await asyncio.sleep(2.0)


async def nats_frozen(stack: Stack) -> None:
    """nats-server SIGSTOPped longer than the consumers' ack wait (30 s), then continued."""
    assert stack.nats.process is not None
    stack.nats.process.send_signal(signal.SIGSTOP)
    await asyncio.sleep(35.0)
    stack.nats.process.send_signal(signal.SIGCONT)


async def ingestion_killed_between_commit_and_publish(stack: Stack) -> None:
    """NATS frozen so commits succeed while publishes hang; ingestion SIGKILLed in that gap."""
    assert stack.nats.process is not None
    stack.nats.process.send_signal(signal.SIGSTOP)
    await asyncio.sleep(1.5)  # requests keep committing; their publishes wait for acks
    kill(stack, "ingestion")
    stack.nats.process.send_signal(signal.SIGCONT)
    await restart(stack, "ingestion")


async def feature_and_trainer_killed_mid_batch(stack: Stack) -> None:
    """feature and trainer SIGKILLed at random moments while they apply batches, three times."""
    rng = random.Random(7)
    for _ in range(3):
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        kill(stack, "feature")
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        kill(stack, "trainer")
        await asyncio.gather(restart(stack, "feature"), restart(stack, "trainer"))


async def trainer_killed_during_export(stack: Stack, times: int = 20) -> None:
    """trainer SIGKILLed twenty times at random points (it exports every second)."""
    rng = random.Random(11)
    for _ in range(times):
        await asyncio.sleep(rng.uniform(0.2, 2.5))
        kill(stack, "trainer")
        await restart(stack, "trainer")


@dataclass(frozen=True)
class Scenario:
    inject: Inject
    #: Events per second per producer while the fault is injected (two producers).
    rate: float = 300.0


SCENARIOS: dict[str, Scenario] = {
    "nats_killed_twice": Scenario(nats_killed_twice),
    "nats_frozen": Scenario(nats_frozen, rate=100.0),
    "ingestion_killed_between_commit_and_publish": Scenario(ingestion_killed_between_commit_and_publish),
    "feature_and_trainer_killed_mid_batch": Scenario(feature_and_trainer_killed_mid_batch),
    # Slow enough that the trainer catches up between its twenty deaths; exports still happen each time.
    "trainer_killed_during_export": Scenario(trainer_killed_during_export, rate=50.0),
}


async def run_named(stack: FaultStack, name: str) -> Verdict:
    """Runs one scenario by name on a started stack; event ids are prefixed with a short form of it."""
    scenario = SCENARIOS[name]
    return await run_scenario(stack, name.replace("_", "")[:12], scenario.inject, rate=scenario.rate)
