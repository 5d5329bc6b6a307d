"""bench/faults.py runs, and its last line is the JSON the report reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]


def test_bench_faults_quick() -> None:
    result = subprocess.run(
        [sys.executable, "bench/faults.py", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=580
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["all_ok"] and summary["lost"] == 0 and summary["duplicated"] == 0
    assert "nats_killed_twice" in summary["scenarios"]
