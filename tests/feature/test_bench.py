"""bench/features.py still runs: a quick smoke run whose last line is the JSON of figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ML100K

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_prints_its_figures_as_json() -> None:
    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens-100K not found at {ML100K}")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "features.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["backlog_events"] == 20_000 and figures["apply_events_per_cpu_s"] > 0
    assert "apply_events_per_s" in figures  # NaN if the service finished before its first answer
    assert figures["probes"] > 0 and figures["read_requests"] > 0 and 0 < figures["rss_mb"] < 2000
    assert set(figures["series"]) == {"backlog_watermark", "visible_latency_ms", "direct_visible_latency_ms"}
