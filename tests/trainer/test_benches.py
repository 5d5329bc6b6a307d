"""bench/accuracy.py and bench/stream.py run end to end with --quick and end with their JSON line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ML100K

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_quick(script: str) -> dict:  # type: ignore[type-arg]
    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens-100K not found at {ML100K}")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    figures: dict = json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[type-arg]
    assert figures["quick"] is True
    return figures


def test_accuracy_quick_reports_both_orders_and_cold_items() -> None:
    figures = run_quick("accuracy.py")
    for order in ("sorted", "random"):
        results = figures["protocol_a"][order]["results"]
        assert set(results) == {"popularity", "item_knn", "ease", "bpr_mf", "freshrec"}
        assert all(0 <= r["hr@10"] <= r["hr@20"] <= 1 for r in results.values())
    cold = figures["protocol_c"]["results"]
    assert {"random", "genre_overlap", "freshrec"} <= set(cold)
    assert math.isclose(cold["random"]["hr@10"], 10 / figures["protocol_c"]["cold_items"], rel_tol=1e-9)
    assert cold["freshrec"]["cold_items_learned"] == 0  # cold items never reached training
    assert "a_sorted_hr@10_vs_best_baseline" in figures["ratios"]


def test_stream_quick_reports_online_frozen_and_throughput() -> None:
    figures = run_quick("stream.py")
    b = figures["protocol_b"]
    for name in ("freshrec", "popularity", "item_knn", "bpr_mf"):
        assert b[name]["events"] == b[f"{name}_frozen"]["events"] == 1_500
    assert figures["ratios"]["online_vs_frozen_hr@10"] > 0
    assert figures["throughput"]["events_per_second_wall"] > 0
    assert figures["throughput"]["export_seconds_median"] > 0
    assert figures["series"]["freshrec_online_hr@10"]
