"""bench/freshness.py --quick runs end to end on the embedded stack and ends with its JSON line."""

from __future__ import annotations

import pytest

from tests.bench.helpers import quick_figures

pytestmark = pytest.mark.slow


def test_freshness_bench_quick_prints_json_with_the_lag_series() -> None:
    figures = quick_figures("freshness.py", timeout_s=240)
    assert figures["probes"] >= 5 and figures["probes_served"] == figures["probes"]
    assert figures["inference_replicas"] == 2
    assert 0 < figures["lag_p50_s"] <= figures["lag_p95_s"] <= figures["lag_max_s"]
    series = figures["series"]["event_to_served_model_lag_s"]
    assert len(series) == figures["probes_served"] and all(len(p) == 2 for p in series)
