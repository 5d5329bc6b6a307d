"""bench/privacy.py --quick runs end to end on the embedded stack and ends with its JSON line."""

from __future__ import annotations

import pytest

from tests.bench.helpers import quick_figures

pytestmark = pytest.mark.slow


def test_privacy_bench_quick_hides_items_and_prints_json() -> None:
    figures = quick_figures("privacy.py", timeout_s=240)
    assert figures["hides"] == 5 and figures["inference_replicas"] == 2
    assert 0 < figures["hide_p50_s"] <= figures["hide_max_s"]
    assert len(figures["per_hide"]) == figures["hides"]
