"""Every scenario: lost = 0, duplicated = 0, unexpected = 0."""

from __future__ import annotations

import pytest

from tests.faults.harness import FaultStack, run_scenario
from tests.faults.scenarios import SCENARIOS

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_no_event_lost_or_applied_twice(tmp_path, name: str) -> None:
    stack = FaultStack(tmp_path)
    stack.start()
    try:
        scenario = SCENARIOS[name]
        verdict = await run_scenario(stack, name.replace("_", "")[:12], scenario.inject, rate=scenario.rate)
    finally:
        stack.stop()
    print(verdict.row(), verdict.notes)
    assert verdict.acknowledged > 0
    assert verdict.ok, verdict.notes
