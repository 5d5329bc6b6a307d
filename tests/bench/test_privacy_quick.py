"""bench/privacy.py --quick runs end to end on the embedded stack and ends with its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_privacy_bench_quick_hides_items_and_prints_json() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "privacy.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["hides"] == 5 and figures["inference_replicas"] == 2
    assert 0 < figures["hide_p50_s"] <= figures["hide_max_s"]
    assert len(figures["per_hide"]) == figures["hides"]
