"""How the command line shows things: rich tables, the demo's live view, summaries."""

from __future__ import annotations

from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import make_url

from cli.demo import DemoResult, Snapshot
from cli.replay import ReplaySummary
from cli.status import InstanceStatus, describe_watermark
from cli.synthetic import SyntheticWorld
from freshrec.v1 import inference_pb2, ingestion_pb2, trainer_pb2

SPARKS = "▁▂▃▄▅▆▇█"
HEALTH_STYLE = {"SERVING": "green", "NOT_SERVING": "red", "UNREACHABLE": "red"}


def when(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M")


def date(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d")


def hide_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def status_table(statuses: list[InstanceStatus], title: str = "freshrec") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("service")
    table.add_column("address")
    table.add_column("health")
    table.add_column("state")
    table.add_column("metrics", overflow="fold")
    for s in statuses:
        state = "; ".join(f"{k}: {v}" for k, v in s.details.items())
        style = HEALTH_STYLE.get(s.health, "yellow")
        table.add_row(s.service, s.address, f"[{style}]{s.health}[/]", state, s.metrics_url)
    return table


def recommendations_table(
    user: str, response: inference_pb2.RecommendResponse, titles: dict[str, str]
) -> Table:
    version = response.model_version or "no model (popularity)"
    table = Table(
        title=f"top {len(response.items)} for {user} — model {version}, trained through "
        f"{describe_watermark(response.trained_through)}",
        title_justify="left",
    )
    for column in ("#", "item", "title", "score", "source", "reason"):
        table.add_column(column, overflow="fold")
    for rank, item in enumerate(response.items, start=1):
        source = (
            inference_pb2.RecommendationSource.Name(item.source)
            .removeprefix("RECOMMENDATION_SOURCE_")
            .lower()
        )
        table.add_row(
            str(rank), item.item_id, titles.get(item.item_id, ""), f"{item.score:.4f}", source, item.reason
        )
    return table


def models_table(response: trainer_pb2.ListModelsResponse) -> Table:
    table = Table(title=f"model versions (live: {response.live_version or 'none'})", title_justify="left")
    for column in ("version", "status", "parent", "created", "trained through", "metrics"):
        table.add_column(column, overflow="fold")
    for m in response.models:
        status = trainer_pb2.ModelStatus.Name(m.status).removeprefix("MODEL_STATUS_").lower()
        style = {"live": "bold green", "rejected": "red"}.get(status, "")
        metrics = ", ".join(
            f"{k.removeprefix('prequential_')} {v:.3f}"
            for k, v in sorted(m.metrics.items())
            if "hr" in k or "ndcg" in k
        )
        created = (
            m.created_at.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%S") if m.HasField("created_at") else ""
        )
        table.add_row(
            m.version,
            f"[{style}]{status}[/]" if style else status,
            m.parent_version or "—",
            created,
            f"seq {m.trained_through.stream_sequence}",
            metrics,
        )
    return table


def replay_summary(summary: ReplaySummary) -> Table:
    table = Table(title="replay summary", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("sent", f"{summary.sent:,}")
    table.add_row("accepted", f"{summary.accepted:,}")
    table.add_row("duplicates (already ingested)", f"{summary.duplicates:,}")
    table.add_row("rejected", f"{summary.rejected:,}")
    table.add_row("elapsed", f"{summary.elapsed_s:.1f} s")
    table.add_row("throughput", f"{summary.events_per_s:,.0f} events/s")
    for reason, count in summary.reasons.most_common(5):
        table.add_row(f"  rejected: {reason}", f"{count:,}")
    return table


def sparkline(values: list[float | None], low: float = 0.0, high: float = 1.0) -> str:
    out = []
    for v in values:
        if v is None:
            out.append(" ")
            continue
        frac = 0.0 if high <= low else min(max((v - low) / (high - low), 0.0), 1.0)
        out.append(SPARKS[min(int(frac * len(SPARKS)), len(SPARKS) - 1)])
    return "".join(out)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def demo_panel(snapshot: Snapshot, world: SyntheticWorld, result: DemoResult, width: int = 60) -> Group:
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column("what", style="bold")
    table.add_column("value")
    versions = sorted(set(snapshot.served_versions))
    table.add_row(
        "time", f"{snapshot.t:5.0f} s   phase {snapshot.phase} (drifts so far: {len(result.drifts)})"
    )
    table.add_row(
        "events/s",
        f"{snapshot.events_per_s:,.0f}   sent {result.events_sent:,}, learned {snapshot.events_learned:,}",
    )
    table.add_row(
        "model served",
        ", ".join(v or "none yet" for v in versions) + f"   ({len(snapshot.served_versions)} replica(s))",
    )
    table.add_row(snapshot.hr_metric, _fmt(snapshot.trainer_hr10))
    table.add_row(
        "taste match@10",
        f"{_fmt(snapshot.taste_match)}   (share of served top-10 in the group's current category; "
        f"random ≈ {1 / world.categories:.2f})",
    )
    history = result.snapshots[-width:]
    drift_marks = "".join("|" if any(s.t - 1 < d <= s.t for d in result.drifts) else " " for s in history)
    lines = Text()
    hr = [s.trainer_hr10 for s in history]
    known = [v for v in hr if v is not None]
    low, high = (min(known), max(known)) if known else (0.0, 1.0)
    lines.append(f"{'hr@10':>14} {sparkline(hr, low, high)}  ({_fmt(low)} to {_fmt(high)})\n")
    lines.append(f"{'taste match':>14} {sparkline([s.taste_match for s in history])}  (0 to 1)\n")
    lines.append(f"{'drift':>14} {drift_marks}")
    return Group(table, lines)


class LiveDemoView:
    """A live-updating panel (on a terminal)."""

    def __init__(self, console: Console) -> None:
        self.live = Live(Text("connecting ..."), console=console, refresh_per_second=4)

    def __enter__(self) -> LiveDemoView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)

    def update(self, snapshot: Snapshot, world: SyntheticWorld, result: DemoResult) -> None:
        self.live.update(demo_panel(snapshot, world, result))


class PlainDemoView:
    """One line per second (pipes, logs, tests)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def __enter__(self) -> PlainDemoView:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def update(self, snapshot: Snapshot, world: SyntheticWorld, result: DemoResult) -> None:
        versions = ",".join(sorted({v or "-" for v in snapshot.served_versions}))
        self.console.print(
            f"t={snapshot.t:5.0f}s phase={snapshot.phase} events/s={snapshot.events_per_s:7.0f} "
            f"sent={result.events_sent} model={versions} {snapshot.hr_metric}={_fmt(snapshot.trainer_hr10)} "
            f"taste_match@10={_fmt(snapshot.taste_match)}",
            highlight=False,
            soft_wrap=True,
        )


def demo_summary(result: DemoResult, world: SyntheticWorld, interrupted: bool) -> Table:
    table = Table(
        title="demo summary" + (" (interrupted)" if interrupted else ""),
        title_justify="left",
        show_header=False,
    )
    table.add_column("what")
    table.add_column("value")
    table.add_row("catalogue items published", f"{result.items_upserted:,}")
    table.add_row("events sent / accepted", f"{result.events_sent:,} / {result.events_accepted:,}")
    table.add_row(
        "drifts",
        f"{len(result.drifts)} at " + ", ".join(f"{d:.0f}s" for d in result.drifts) if result.drifts else "0",
    )
    versions = sorted({v for s in result.snapshots for v in s.served_versions if v})
    table.add_row("model versions served", ", ".join(versions[-6:]) or "none")
    for start, end, label in _phases(result):
        phase = [s for s in result.snapshots if start <= s.t < end]
        match = [s.taste_match for s in phase if s.taste_match is not None]
        if len(match) >= 2:
            table.add_row(f"taste match@10, {label}", f"first {match[0]:.2f} → last {match[-1]:.2f}")
    table.add_row("random taste match", f"{1 / world.categories:.2f}")
    return table


def _phases(result: DemoResult) -> list[tuple[float, float, str]]:
    bounds = [0.0, *result.drifts, float("inf")]
    return [(bounds[i], bounds[i + 1], f"phase {i}") for i in range(len(bounds) - 1)]


def forget_progress(state: Any) -> str:
    """One line: each service's state in a forget request, e.g. ``ingestion done, feature pending``."""
    parts = []
    for p in state.progress:
        name = f"{p.service}/{p.replica}" if p.replica else p.service
        parts.append(f"{name} {'done' if p.state == ingestion_pb2.FORGET_STATE_DONE else 'pending'}")
    return ", ".join(parts)
