"""bench/ingest.py stays runnable: a --quick run ends with one JSON object of figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_prints_its_figures_as_json() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ingest.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["exactly_once"] is True
    assert figures["grpc_events_per_s"] > 0 and figures["nats_events_per_s"] > 0
    assert figures["raw_publish_async_msgs_per_s"] > 0
    assert 0 < figures["ingestion_rss_mb"] < 1000
    assert {"grpc_events_per_s", "nats_events_per_s", "raw_msgs_per_s"} <= set(figures["series"])
