"""Running a benchmark's ``--quick`` mode as ``make bench`` would, for the smoke tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def quick_figures(script: str, timeout_s: float, args: list[str] | None = None) -> dict[str, Any]:
    """Runs ``bench/<script> --quick`` from the repository root; its last line, parsed as JSON."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", *(args or [])],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures
