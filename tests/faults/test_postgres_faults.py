"""PostgreSQL restarted under load: ingestion, feature and trainer keep their state in a private
PostgreSQL cluster that is stopped and started again while events stream."""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.harness import FaultStack, run_scenario
from tests.faults.postgres import PrivatePostgres

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(900)]


async def test_postgres_restarted_under_load(tmp_path) -> None:
    postgres = PrivatePostgres()
    postgres.start()
    try:
        urls = {name: postgres.create_database(name) for name in ("ingestion", "feature", "trainer")}
        stack = FaultStack(tmp_path)
        for name, url in urls.items():
            stack.services[name].env["FRESHREC_DATABASE__URL"] = url
        stack.start()

        async def inject(_stack: FaultStack) -> None:
            for _ in range(2):
                await asyncio.to_thread(postgres.stop, "fast")
                await asyncio.sleep(2.0)
                await asyncio.to_thread(postgres.start)
                await asyncio.sleep(2.0)

        try:
            verdict = await run_scenario(stack, "pgrestart", inject, rate=200.0)
        finally:
            stack.stop()
    finally:
        postgres.destroy()
    print(verdict.row(), verdict.notes)
    assert verdict.acknowledged > 0
    assert verdict.ok, verdict.notes
