"""bench/forget.py --quick runs end to end on the embedded stack and ends with its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_forget_bench_quick_prints_json_with_latencies_and_no_traces() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "forget.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["forgets"] == 2 and len(figures["latencies_s"]) == 2
    assert 0 < figures["forget_p50_s"] <= figures["forget_max_s"]
    assert figures["traces_found"] == 0
