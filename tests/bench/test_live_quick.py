"""bench/live.py --quick drives a real stack through the public API and ends with its JSON line:
served figures beside the baselines of the same stream, and the trainer's own figure for them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_live_bench_quick_prints_served_and_baseline_figures() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "live.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    run = figures["synth-shop"]["batch_10"]
    assert run["served"]["events"] == 300 and 0 <= run["served"]["hr@10"] <= 1
    assert {"popularity", "last-item transitions", "item-kNN (online)"} <= set(run["baselines"])
    assert run["best_baseline"] in run["baselines"]
    assert run["trainer_reported"]["served_evaluated"] > 0 and "hr@10" in run["trainer_reported"]
    assert run["recommend_errors"] == {} and run["recommend_p50_ms"] > 0
    assert "worst_ratio_vs_best_baseline" in figures["summary"]["batch_10"]
    assert figures["headline"] and not figures["env"]
