"""bench/serve.py keeps running: its --quick smoke run ends with one JSON object of figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_bench_quick_run_prints_its_figures() -> None:
    bench = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "serve.py"), "--quick"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        stdout, stderr = bench.communicate(timeout=220)
    except subprocess.TimeoutExpired:
        bench.terminate()  # the bench stops its services on SIGTERM
        stdout, stderr = bench.communicate(timeout=60)
        pytest.fail(f"bench/serve.py --quick did not finish within 220 s: {stderr[-2000:]}")
    assert bench.returncode == 0, stderr[-3000:]
    figures = json.loads(stdout.strip().splitlines()[-1])
    assert figures["bench"] == "serve" and figures["quick"] is True
    assert figures["catalogue_served"] >= figures["catalogue_items"]
    for phase in ("open_loop", "closed_loop", "echo_closed_loop", "steady", "reloads"):
        assert figures[phase]["requests"] > 0 and figures[phase]["p99_ms"] > 0, phase
    # Correctness, not speed: no request fails, reloads all land, the event shows up.
    assert figures["reloads"]["errors"] == 0 and figures["reloads"]["all_swapped"]
    assert figures["open_loop"]["errors"] == 0 and figures["closed_loop"]["errors"] == 0
    assert figures["freshness"]["changed"] == figures["freshness"]["probes"]
    # Lists were published by the replica that publishes them (and only by it).
    served = figures["served_lists"]
    assert served["errors"] == 0 and 0 < served["lists_stored"] <= served["requests_publishing"]
    assert 0 <= figures["ann"]["recall_at_10"] <= 1
    assert figures["series"]["reload_p99_ms_per_s"]
