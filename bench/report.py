"""``make bench``: run every benchmark script and write a report with plots.

Each ``bench/*.py`` (but this one and ``_*.py`` helpers) is run as
``python bench/<name>.py [--quick]``; it prints a readable table and then, on its last line, one
JSON object with its figures, optionally with ``"series": {"<name>": [[x, y], ...]}`` for plots.
This writes ``bench/results/<date>/``:

- ``<name>.json``: the script's JSON; ``<name>.log``: everything it printed;
- ``*.png``: the headline plots (prequential HR@10 online vs frozen, Recommend latency,
  ingestion throughput over time, event → served-model lag) and one figure per script's series;
- ``REPORT.md``: a table of every script (ok, failed, timed out, no JSON, missing), the
  figures, the plots;

and rewrites the benchmark table between the markers in ``bench/README.md``. A script that is
missing, fails, hangs or prints no JSON is reported as such; the others still run. Notes written by
hand under a last ``## Notes`` heading of ``REPORT.md`` are kept when it is written again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Scripts the report expects (other issues write them); a missing one is listed as missing.
EXPECTED = ("accuracy", "stream", "serve", "ingest", "features", "freshness", "live")
#: Scripts that need longer than ``--timeout``: live.py runs a stack per stream and batch size.
LONGER = {"live": 4 * 3600.0}
README_BEGIN = "<!-- bench:begin (written by bench/report.py) -->"
README_END = "<!-- bench:end -->"
#: The heading under which REPORT.md holds hand-written notes about its run (kept on a rewrite).
NOTES_HEADING = "## Notes"
#: Headline plots: file name, title, axis labels, and which (script, series name) pairs feed them.
HEADLINES: tuple[tuple[str, str, tuple[str, str], Callable[[str, str], bool]], ...] = (
    (
        "prequential_hr10.png",
        "Prequential HR@10 over the stream: online vs frozen",
        ("events", "HR@10"),
        lambda script, n: "hr" in n and ("online" in n or "frozen" in n),
    ),
    (
        "recommend_latency.png",
        "Recommend latency",
        ("seconds into the run", "latency (ms)"),
        lambda script, n: (
            (script == "serve" and ("latency" in n or "_ms" in n)) or ("recommend" in n and "latency" in n)
        ),
    ),
    (
        "ingest_throughput.png",
        "Ingestion throughput over time",
        ("seconds", "events/s"),
        lambda script, n: (
            (script == "ingest" or "ingest" in n)
            and ("throughput" in n or "events_per_s" in n or "rate" in n)
        ),
    ),
    (
        "event_to_model_lag.png",
        "Event → served-model lag",
        ("seconds", "lag (s)"),
        lambda script, n: "lag" in n and ("model" in n or script in ("freshness", "stream")),
    ),
)
MAX_README_FIGURES = 8
#: Without a script's own ``"headline"`` list, the README shows the figures whose names say most
#: about quality and speed first (configuration echoes such as ``quick`` or ``items`` last).
INTERESTING = (
    "hr@",
    "ndcg",
    "p50",
    "p95",
    "p99",
    "per_s",
    "ratio",
    "lag",
    "rss",
    "recall",
    "throughput",
    "_ms",
)


@dataclass
class Outcome:
    """What happened when one script ran."""

    name: str
    status: str  # ok | failed | timeout | no-json | missing
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    series: dict[str, list[list[float]]] = field(default_factory=dict)
    detail: str = ""
    headline: list[str] = field(default_factory=list)

    def readme_figures(self) -> list[tuple[str, Any]]:
        """The few figures the README table shows: the script's headline, else the most telling."""
        if self.headline:
            return [(k, self.figures[k]) for k in self.headline if k in self.figures][:MAX_README_FIGURES]
        scored = sorted(
            enumerate(self.figures.items()),
            key=lambda item: (
                -sum(bool(re.search(rf"(?<![a-z]){re.escape(w)}", item[1][0].lower())) for w in INTERESTING),
                item[0],
            ),
        )
        return [pair for _, pair in scored[:MAX_README_FIGURES]]


def discover(bench_dir: Path) -> list[Path]:
    return sorted(
        p for p in bench_dir.glob("*.py") if p.name != "report.py" and not p.name.startswith(("_", "test"))
    )


def last_json_line(stdout: str) -> dict[str, Any] | None:
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        parsed = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def run_script(script: Path, out_dir: Path, quick: bool, timeout_s: float, echo: bool) -> Outcome:
    name = script.stem
    command = [sys.executable, str(script), *(["--quick"] if quick else [])]
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=env)
        stdout, stderr, code = result.stdout, result.stderr, result.returncode
        timed_out = False
    except subprocess.TimeoutExpired as exc:
        stdout = _text(exc.stdout)
        stderr = _text(exc.stderr)
        code, timed_out = -1, True
    seconds = time.monotonic() - started
    (out_dir / f"{name}.log").write_text(
        f"$ {' '.join(command)}\n\n{stdout}\n--- stderr ---\n{stderr}\n"
        f"--- exit {code} after {seconds:.1f}s ---\n"
    )
    if echo:
        print("\n".join(stdout.rstrip().splitlines()[:-1]), flush=True)
    if timed_out:
        return Outcome(name, "timeout", seconds, detail=f"did not finish within {timeout_s:.0f}s")
    if code != 0:
        return Outcome(name, "failed", seconds, detail=f"exit {code}: {_tail(stderr or stdout)}")
    doc = last_json_line(stdout)
    if doc is None:
        return Outcome(name, "no-json", seconds, detail=f"last line is not a JSON object: {_tail(stdout, 1)}")
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    return outcome_of(name, seconds, doc)


def outcome_of(name: str, seconds: float, doc: dict[str, Any]) -> Outcome:
    """An ``ok`` outcome from a script's JSON object."""
    series = doc.get("series") if isinstance(doc.get("series"), dict) else {}
    headline = [str(k) for k in doc.get("headline", [])] if isinstance(doc.get("headline"), list) else []
    figures = flatten({k: v for k, v in doc.items() if k not in ("series", "headline")})
    return Outcome(name, "ok", seconds, figures, clean(series), headline=headline)


def load_outcomes(out_dir: Path) -> list[Outcome]:
    """The outcomes of an earlier run, from its summary.json and JSON files (to re-render)."""
    summary = json.loads((out_dir / "summary.json").read_text())
    outcomes = []
    for name, info in summary.items():
        if info["status"] == "ok":
            doc = json.loads((out_dir / f"{name}.json").read_text())
            outcomes.append(outcome_of(name, float(info["seconds"]), doc))
        else:
            outcomes.append(Outcome(name, info["status"], float(info["seconds"]), detail=info["detail"]))
    return outcomes


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])[:400]


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; keeps numbers, booleans and short strings."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 60):
            out[name] = value
    return out


def clean(series: dict[str, Any]) -> dict[str, list[list[float]]]:
    """Keeps well-formed series: lists of [x, y] with finite numbers."""
    out = {}
    for name, points in series.items():
        if not isinstance(points, list):
            continue
        good = [
            [float(p[0]), float(p[1])]
            for p in points
            if isinstance(p, list | tuple)
            and len(p) == 2
            and all(isinstance(v, int | float) and math.isfinite(v) for v in p)
        ]
        if good:
            out[str(name)] = good
    return out


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or 0.001 <= abs(value) < 100_000:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


# -- plots ----------------------------------------------------------------------------------------


def plot(outcomes: list[Outcome], out_dir: Path) -> dict[str, list[str]]:
    """Writes the PNGs; returns the headline files written and, per script, its figure file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, list[str]] = {"headlines": []}
    for filename, title, (xlabel, ylabel), wanted in HEADLINES:
        lines = [
            (f"{o.name}: {s}", points)
            for o in outcomes
            for s, points in o.series.items()
            if wanted(o.name, s.lower()) and not s.lower().endswith("_at_s")
        ]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, points in lines:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=label, linewidth=1.5, marker="." if len(xs) <= 200 else None)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=110)
        plt.close(fig)
        written["headlines"].append(filename)
    for o in outcomes:
        if not o.series:
            continue
        names = list(o.series)[:9]
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names, strict=False):
            xs, ys = zip(*o.series[name], strict=True)
            ax.plot(xs, ys, linewidth=1.2)
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        fig.suptitle(f"bench/{o.name}.py")
        fig.tight_layout()
        fig.savefig(out_dir / f"{o.name}.png", dpi=100)
        plt.close(fig)
        written[o.name] = [f"{o.name}.png"]
    return written


# -- report and README ----------------------------------------------------------------------------


def machine() -> str:
    cores = os.cpu_count()
    return f"{platform.system()} {platform.machine()}, {cores} cores, Python {platform.python_version()}"


def write_report(outcomes: list[Outcome], plots: dict[str, list[str]], out_dir: Path, command: str) -> Path:
    lines = [
        f"# freshrec benchmark report, {out_dir.name}",
        "",
        f"{command} on {machine()}, finished {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        "Each script's full output is in `<name>.log` beside this file, its figures in `<name>.json`.",
        "",
        "| script | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        note = (
            o.detail.replace("|", "/")
            if o.status != "ok"
            else f"{len(o.figures)} figures, {len(o.series)} series"
        )
        lines.append(f"| `bench/{o.name}.py` | {o.status} | {o.seconds:.0f} | {note} |")
    titles = {filename: title for filename, title, _, _ in HEADLINES}
    lines += ["", "## Headline plots", ""]
    for filename, title, _, _ in HEADLINES:
        if filename in plots["headlines"]:
            lines += [f"### {title}", "", f"![{title}]({filename})", ""]
        else:
            lines += [
                f"### {titles[filename]}",
                "",
                "_No script reported a series for this plot in this run._",
                "",
            ]
    for o in outcomes:
        if o.status != "ok":
            continue
        lines += [f"## bench/{o.name}.py", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in o.figures.items()]
        lines.append("")
        if o.name in plots:
            lines += [f"![{o.name}]({o.name}.png)", ""]
    path = out_dir / "REPORT.md"
    text = "\n".join(lines)
    old = path.read_text() if path.exists() else ""
    notes = old.find(f"\n{NOTES_HEADING}\n")
    if notes >= 0:
        text = text.rstrip("\n") + "\n\n" + old[notes + 1 :]
    path.write_text(text)
    return path


def readme_section(outcomes: list[Outcome], out_dir: Path, command: str, readme: Path) -> str:
    relative = Path(os.path.relpath(out_dir / "REPORT.md", readme.parent)).as_posix()
    lines = [
        README_BEGIN,
        f"Latest report: [`{relative}`]({relative}), produced by {command} on {machine()}.",
        "",
        "| benchmark | figure | value |",
        "|---|---|---|",
    ]
    for o in outcomes:
        if o.status != "ok":
            lines.append(f"| `bench/{o.name}.py` | ({o.status}) | {o.detail[:80].replace('|', '/')} |")
            continue
        shown = o.readme_figures()
        for k, v in shown:
            lines.append(f"| `bench/{o.name}.py` | {k} | {fmt(v)} |")
        if len(o.figures) > len(shown):
            lines.append(f"| `bench/{o.name}.py` | … {len(o.figures) - len(shown)} more in the report | |")
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(readme: Path, section: str) -> bool:
    """Replaces the marked section; False (README untouched) when the markers are missing."""
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        return False
    readme.write_text(text[:begin] + section + text[end + len(README_END) :])
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-dir", type=Path, default=ROOT / "bench", help="folder of the scripts")
    parser.add_argument(
        "--results-dir", type=Path, default=ROOT / "bench" / "results", help="where reports go"
    )
    parser.add_argument("--date", default=datetime.now().strftime("%Y-%m-%d"), help="report folder name")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script (a smoke run)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one script may run")
    parser.add_argument("--only", nargs="*", default=None, help="run only these scripts (names without .py)")
    parser.add_argument(
        "--readme",
        type=Path,
        default=ROOT / "bench" / "README.md",
        help="the benchmarks' README whose table to rewrite (default bench/README.md)",
    )
    parser.add_argument("--no-readme", action="store_true", help="leave the benchmarks' README alone")
    parser.add_argument(
        "--expect", nargs="*", default=list(EXPECTED), help="scripts reported missing if absent"
    )
    parser.add_argument("--quiet", action="store_true", help="do not echo the scripts' tables")
    parser.add_argument(
        "--rerender", action="store_true", help="run nothing: redraw the report of --date from its files"
    )
    args = parser.parse_args(argv)

    out_dir = args.results_dir / args.date
    out_dir.mkdir(parents=True, exist_ok=True)
    scripts = discover(args.bench_dir)
    if args.only is not None:
        scripts = [s for s in scripts if s.stem in args.only]
    command = "`make bench" + (" (--quick)" if args.quick else "") + "`"
    if args.only is not None:
        command += " (its scripts run in parts with `bench/report.py --only`)"
    outcomes: list[Outcome] = []
    if args.rerender:
        scripts = []
        outcomes = load_outcomes(out_dir)
        args.expect = []
    for script in scripts:
        print(f"== bench/{script.name}", flush=True)
        timeout = args.timeout if args.quick else max(args.timeout, LONGER.get(script.stem, 0.0))
        outcome = run_script(script, out_dir, args.quick, timeout, echo=not args.quiet)
        print(
            f"-- {script.stem}: {outcome.status} in {outcome.seconds:.0f}s {outcome.detail}".rstrip(),
            flush=True,
        )
        outcomes.append(outcome)
    if args.only is not None and (out_dir / "summary.json").exists():
        # A partial run keeps the other scripts' figures from earlier runs of the same date.
        ran_now = {o.name for o in outcomes}
        outcomes += [o for o in load_outcomes(out_dir) if o.name not in ran_now]
    present = {s.stem for s in discover(args.bench_dir)}
    for name in args.expect:
        if name not in present and name not in {o.name for o in outcomes}:
            outcomes.append(Outcome(name, "missing", detail=f"bench/{name}.py does not exist yet"))
    plots = plot(outcomes, out_dir)
    report = write_report(outcomes, plots, out_dir, command)
    (out_dir / "summary.json").write_text(
        json.dumps(
            {
                o.name: {"status": o.status, "seconds": round(o.seconds, 1), "detail": o.detail}
                for o in outcomes
            },
            indent=2,
        )
        + "\n"
    )
    if not args.no_readme:
        if update_readme(args.readme, readme_section(outcomes, out_dir, command, args.readme)):
            print(f"updated the benchmark table in {args.readme}")
        else:
            print(f"{args.readme} has no {README_BEGIN!r} marker; left it alone")
    print(f"report: {report}")
    ran = [o for o in outcomes if o.status != "missing"]
    return 0 if all(o.status == "ok" for o in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
