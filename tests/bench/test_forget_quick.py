"""bench/forget.py --quick runs end to end on the embedded stack and ends with its JSON line."""

from __future__ import annotations

import pytest

from tests.bench.helpers import quick_figures

pytestmark = pytest.mark.slow


def test_forget_bench_quick_prints_json_with_latencies_and_no_traces() -> None:
    figures = quick_figures("forget.py", timeout_s=300)
    assert figures["forgets"] == 2 and len(figures["latencies_s"]) == 2
    assert 0 < figures["forget_p50_s"] <= figures["forget_max_s"]
    assert figures["traces_found"] == 0
