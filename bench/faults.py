"""Fault injection under load: every scenario of the fault suite, as a table.

Each scenario streams uniquely identified events through the real embedded stack while it injects
its fault (NATS killed or frozen, services killed, PostgreSQL restarted), drains, and classifies
every event id. lost, duplicated and unexpected must all be 0; recovery is the time from the end
of the fault to the next acknowledged event, drain the time for the stack to catch up after.

    .venv/bin/python bench/faults.py            # every scenario (several minutes)
    .venv/bin/python bench/faults.py --quick    # NATS killed and restarted twice, only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults.harness import FaultStack, Verdict  # noqa: E402
from tests.faults.scenarios import SCENARIOS, run_named  # noqa: E402

COLUMNS = (
    "attempted",
    "acknowledged",
    "stored",
    "in_stream",
    "applied",
    "lost",
    "duplicated",
    "unexpected",
    "bad_artifacts",
    "recovery_s",
    "drain_s",
)


async def one(name: str) -> tuple[Verdict, float]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="freshrec-faults-") as tmp:
        stack = FaultStack(Path(tmp))
        stack.start()
        try:
            verdict = await run_named(stack, name)
        finally:
            stack.stop()
    return verdict, time.monotonic() - started


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one short scenario: a smoke run")
    parser.add_argument("--only", action="append", choices=list(SCENARIOS), help="run only these scenarios")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    names = ["nats_killed_twice"] if args.quick else (args.only or list(SCENARIOS))

    rows = {}
    header = f"{'scenario':<46}" + "".join(f"{c:>13}" for c in COLUMNS) + f"{'ok':>5}"
    print(header)
    print("-" * len(header))
    for name in names:
        verdict, seconds = await one(name)
        row = verdict.row() | {"seconds": round(seconds, 1), "notes": verdict.notes}
        rows[name] = row
        print(
            f"{name:<46}" + "".join(f"{row[c]:>13}" for c in COLUMNS) + f"{'yes' if verdict.ok else 'NO':>5}"
        )
        for note in verdict.notes:
            print(f"    {note}")
    ok = all(r["ok"] for r in rows.values())
    summary = {
        "scenarios": rows,
        "all_ok": ok,
        "lost": sum(r["lost"] for r in rows.values()),
        "duplicated": sum(r["duplicated"] for r in rows.values()),
        "unexpected": sum(r["unexpected"] for r in rows.values()),
        "max_recovery_s": max(r["recovery_s"] for r in rows.values()),
        "max_drain_s": max(r["drain_s"] for r in rows.values()),
        "headline": ["lost", "duplicated", "unexpected", "max_recovery_s", "max_drain_s"],
    }
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
