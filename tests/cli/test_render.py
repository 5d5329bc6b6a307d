"""What the demo's live panel and the tables show."""

from __future__ import annotations

from rich.console import Console

from cli.demo import DemoResult, Snapshot
from cli.render import demo_panel, demo_summary, sparkline
from cli.synthetic import SyntheticWorld


def snapshots(n: int) -> list[Snapshot]:
    return [
        Snapshot(
            t=float(i + 1),
            events_sent=(i + 1) * 100,
            events_per_s=100.0,
            phase=int(i >= 3),
            served_versions=["v000002", "v000002"],
            trainer_hr10=0.10 + 0.01 * i,
            hr_metric="prequential_hr@10_recent",
            taste_match=None if i == 0 else 0.1 * i,
        )
        for i in range(n)
    ]


def render(renderable: object) -> str:
    console = Console(width=120, record=True)
    console.print(renderable)
    return console.export_text()


def test_sparkline_scales_and_shows_gaps() -> None:
    assert sparkline([0.0, 0.5, 1.0, None]) == "▁▅█ "
    assert sparkline([2.0, 3.0], low=2.0, high=3.0) == "▁█"
    assert sparkline([5.0], low=1.0, high=1.0) == "▁"


def test_demo_panel_shows_rate_model_hr_and_drifts() -> None:
    world = SyntheticWorld(categories=5, groups=4)
    result = DemoResult(snapshots=snapshots(6), drifts=[3.5], events_sent=600)
    text = render(demo_panel(result.snapshots[-1], world, result))
    assert "phase 1 (drifts so far: 1)" in text
    assert "v000002   (2 replica(s))" in text
    assert "prequential_hr@10_recent    0.150" in text
    assert "random ≈ 0.20" in text
    assert "(0.100 to 0.150)" in text
    drift_line = next(line for line in text.splitlines() if line.strip().startswith("drift"))
    assert drift_line.count("|") == 1


def test_demo_summary_reports_each_phase() -> None:
    world = SyntheticWorld()
    result = DemoResult(snapshots=snapshots(6), drifts=[3.5], events_sent=600, events_accepted=600)
    text = render(demo_summary(result, world, interrupted=False))
    assert "600 / 600" in text and "1 at 4s" in text
    assert "taste match@10, phase 0" in text and "first 0.10 → last 0.20" in text
    assert "taste match@10, phase 1" in text and "first 0.30 → last 0.50" in text
