"""bench/live.py --quick drives a real stack through the public API and ends with its JSON line:
served figures beside the baselines of the same stream, and the trainer's own figure for them."""

from __future__ import annotations

import pytest

from tests.bench.helpers import quick_figures

pytestmark = pytest.mark.slow


def test_live_bench_quick_prints_served_and_baseline_figures() -> None:
    figures = quick_figures("live.py", timeout_s=280)
    run = figures["synth-shop"]["batch_10"]
    assert run["served"]["events"] == 300 and 0 <= run["served"]["hr@10"] <= 1
    assert {"popularity", "last-item transitions", "item-kNN (online)"} <= set(run["baselines"])
    assert run["best_baseline"] in run["baselines"]
    assert run["trainer_reported"]["served_evaluated"] > 0 and "hr@10" in run["trainer_reported"]
    assert run["recommend_errors"] == {} and run["recommend_p50_ms"] > 0
    assert "worst_ratio_vs_best_baseline" in figures["summary"]["batch_10"]
    assert figures["headline"] and not figures["env"]
