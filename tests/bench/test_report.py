"""`make bench`'s harness on fake benchmark scripts: a good one with series, one that fails, one
that prints no JSON, one that hangs, one expected but missing. The report says which is which,
keeps each script's JSON and log, draws the plots, and rewrites the marked table of the benchmarks'
README (bench/README.md)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402

GOOD = """
import json, sys
quick = "--quick" in sys.argv
print("figure      value")
print("hr@10       0.25")
print(json.dumps({
    "quick": quick,
    "hr@10": {"online": 0.25, "frozen": 0.2},
    "ratio": 1.25,
    "note": "fake",
    "series": {
        "hr@10_online": [[i * 100, 0.1 + i / 100] for i in range(50)],
        "hr@10_frozen": [[i * 100, 0.1] for i in range(50)],
        "recommend_latency_cdf": [[0.5, 0.1], [1.0, 0.5], [2.0, 0.99]],
        "broken": [[1, "x"], [2]],
    },
}))
"""
FAILS = "import sys\nprint('starting')\nprint('boom: no data', file=sys.stderr)\nsys.exit(3)\n"
NO_JSON = "print('a table but no JSON at the end')\n"
HANGS = "import time\nprint('working', flush=True)\ntime.sleep(60)\n"
README = "# project\n\nintro\n\n{begin}\nold table\n{end}\n\n## after\n"


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    folder = tmp_path / "bench"
    folder.mkdir()
    for name, body in {"good": GOOD, "fails": FAILS, "nojson": NO_JSON, "hangs": HANGS}.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(body))
    (folder / "_helper.py").write_text("raise SystemExit('helpers are not benchmarks')\n")
    return folder


def test_report_on_good_failing_silent_hanging_and_missing_scripts(bench: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README.format(begin=report.README_BEGIN, end=report.README_END))
    code = report.main(
        [
            "--bench-dir",
            str(bench),
            "--results-dir",
            str(tmp_path / "results"),
            "--date",
            "2026-01-02",
            "--readme",
            str(readme),
            "--timeout",
            "5",
            "--quick",
            "--expect",
            "good",
            "ingest",
            "--quiet",
        ]
    )
    assert code == 1, "a failing script makes the run fail, after the report is written"
    out = tmp_path / "results" / "2026-01-02"
    summary = json.loads((out / "summary.json").read_text())
    assert {k: v["status"] for k, v in summary.items()} == {
        "fails": "failed",
        "good": "ok",
        "hangs": "timeout",
        "nojson": "no-json",
        "ingest": "missing",
    }
    assert "exit 3" in summary["fails"]["detail"] and "boom: no data" in summary["fails"]["detail"]

    # The good script's JSON is kept as printed, --quick was passed, its log holds the table.
    good = json.loads((out / "good.json").read_text())
    assert good["quick"] is True and good["hr@10"]["online"] == 0.25
    assert "hr@10       0.25" in (out / "good.log").read_text()
    assert "working" in (out / "hangs.log").read_text()
    assert not (out / "fails.json").exists()

    # Plots: the online-vs-frozen headline, the latency headline, the script's own figure.
    for png in ("prequential_hr10.png", "recommend_latency.png", "good.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert not (out / "ingest_throughput.png").exists()

    text = (out / "REPORT.md").read_text()
    assert "| `bench/fails.py` | failed |" in text and "| `bench/ingest.py` | missing |" in text
    assert "![Prequential HR@10 over the stream: online vs frozen](prequential_hr10.png)" in text
    assert "| hr@10.online | 0.25 |" in text and "| note | fake |" in text
    assert "_No script reported a series for this plot in this run._" in text

    # The README's marked table is replaced, everything around it kept; the link is relative to it.
    new = readme.read_text()
    assert "old table" not in new
    assert new.startswith("# project\n\nintro\n\n") and new.endswith("\n\n## after\n")
    assert "| `bench/good.py` | ratio | 1.25 |" in new
    assert "| `bench/hangs.py` | (timeout) |" in new
    assert "](results/2026-01-02/REPORT.md)" in new


def test_readme_without_markers_is_left_alone(bench: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# untouched\n")
    code = report.main(
        [
            "--bench-dir",
            str(bench),
            "--results-dir",
            str(tmp_path / "results"),
            "--only",
            "good",
            "--expect",
            "--readme",
            str(readme),
            "--quiet",
        ]
    )
    assert code == 0
    assert readme.read_text() == "# untouched\n"


def test_the_benchmarks_readme_has_the_table_to_rewrite() -> None:
    text = (ROOT / "bench" / "README.md").read_text()
    assert report.README_BEGIN in text and report.README_END in text


def test_series_are_cleaned_and_figures_flattened() -> None:
    assert report.clean({"a": [[1, 2], [3, float("nan")], [4], "x"], "b": "nope"}) == {"a": [[1.0, 2.0]]}
    assert report.flatten({"a": {"b": 1, "c": [1, 2]}, "d": True, "e": "x" * 100}) == {"a.b": 1, "d": True}
    assert report.last_json_line('table\n{"x": 1}\n\n') == {"x": 1}
    assert report.last_json_line("[1, 2]") is None


def test_the_real_bench_folder_is_discovered() -> None:
    names = {p.stem for p in report.discover(ROOT / "bench")}
    assert "report" not in names


def test_readme_shows_a_scripts_headline_or_the_most_telling_figures() -> None:
    chosen = report.Outcome("x", "ok", figures={"quick": True, "duration_s": 5, "p99_ms": 3.0, "hr@10": 0.2})
    assert [k for k, _ in chosen.readme_figures()][:2] == ["p99_ms", "hr@10"]
    assert "duration_s" in dict(chosen.readme_figures())  # 'ratio' inside 'duration' is not a ratio
    assert [k for k, _ in chosen.readme_figures()][-2:] == ["quick", "duration_s"]
    named = report.Outcome("x", "ok", figures={"a": 1, "b": 2, "c": 3}, headline=["c", "missing", "a"])
    assert named.readme_figures() == [("c", 3), ("a", 1)]


def test_rerender_redraws_a_report_without_running_anything(bench: Path, tmp_path: Path) -> None:
    args = ["--bench-dir", str(bench), "--results-dir", str(tmp_path / "r"), "--date", "d", "--no-readme"]
    report.main([*args, "--only", "good", "nojson", "--expect", "--quiet"])
    out = tmp_path / "r" / "d"
    first = (out / "REPORT.md").read_text()
    notes = "## Notes\n\nA note written by hand about this run.\n"
    (out / "REPORT.md").write_text(first + "\n" + notes)
    (out / "good.png").unlink()
    (bench / "good.py").write_text("raise SystemExit(9)\n")  # would fail if it ran again
    assert report.main([*args, "--rerender"]) == 1  # nojson is still not ok
    again = (out / "REPORT.md").read_text()
    # The same but for the timestamp line, and the hand-written notes are kept.
    assert again.split("\n", 3)[3] == first.rstrip("\n").split("\n", 3)[3] + "\n\n" + notes
    assert (out / "good.png").is_file()


def test_a_partial_run_keeps_the_other_scripts_of_the_day(bench: Path, tmp_path: Path) -> None:
    args = ["--bench-dir", str(bench), "--results-dir", str(tmp_path / "r"), "--date", "d", "--no-readme"]
    report.main([*args, "--only", "good", "--expect", "--quiet"])
    report.main([*args, "--only", "nojson", "--expect", "--quiet"])
    summary = json.loads((tmp_path / "r" / "d" / "summary.json").read_text())
    assert summary["good"]["status"] == "ok" and summary["nojson"]["status"] == "no-json"
    assert "| hr@10.online | 0.25 |" in (tmp_path / "r" / "d" / "REPORT.md").read_text()
