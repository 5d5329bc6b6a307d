"""Every scenario: lost = 0, duplicated = 0, unexpected = 0."""

from __future__ import annotations

import pytest

from tests.faults.harness import FaultStack
from tests.faults.scenarios import SCENARIOS, run_named

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_no_event_lost_or_applied_twice(tmp_path, name: str) -> None:
    stack = FaultStack(tmp_path)
    stack.start()
    try:
        verdict = await run_named(stack, name)
    finally:
        stack.stop()
    print(verdict.row(), verdict.notes)
    assert verdict.acknowledged > 0
    assert verdict.ok, verdict.notes
