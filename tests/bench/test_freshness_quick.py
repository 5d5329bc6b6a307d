"""bench/freshness.py --quick runs end to end on the embedded stack and ends with its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_freshness_bench_quick_prints_json_with_the_lag_series() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "freshness.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["probes"] >= 5 and figures["probes_served"] == figures["probes"]
    assert figures["inference_replicas"] == 2
    assert 0 < figures["lag_p50_s"] <= figures["lag_p95_s"] <= figures["lag_max_s"]
    series = figures["series"]["event_to_served_model_lag_s"]
    assert len(series) == figures["probes_served"] and all(len(p) == 2 for p in series)
