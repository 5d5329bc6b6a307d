"""Streaming accuracy on MovieLens-100K: protocol B (prequential, test-then-train), plus the
trainer's learning throughput and export time.

All 100,000 ratings sorted by (time, user, item). Every model trains on the first 50 %, then the
rest is walked in micro-batches of 100: each event of a batch is scored by the current model
(all 1,682 items ranked for that user, excluding items the user touched before that event; a
hit when the event's item is in the top 10, ties at their expected rank), then the model learns
from the batch. Each model also runs frozen after warm-up (user histories still fresh, weights
fixed) beside it, on the same events. Models: freshrec (the trainer's ``Learner`` with the
service's default settings; its frozen twin is the warm-up version scored exactly as its export
would serve), popularity (running counts), item-kNN (incremental co-occurrence), BPR-MF (SGD steps
on each batch).

Then: learning throughput in ``online`` mode with the service's defaults (micro-batches of 256,
one torch thread, the second half of the stream learned from the warm-up checkpoint), and export
plus validation time of the final model.

    .venv/bin/python bench/stream.py            # the full run (a few minutes)
    .venv/bin/python bench/stream.py --quick    # a smoke run on a slice of the stream

Prints a table, then one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from recsys import data  # noqa: E402
from recsys.baselines import BPR, OnlineCooccurrence  # noqa: E402
from recsys.metrics import rank  # noqa: E402

from services.trainer import datasets  # noqa: E402
from services.trainer.checkpoint import restore, to_bytes  # noqa: E402
from services.trainer.export import export_learner  # noqa: E402
from services.trainer.learner import Learner  # noqa: E402
from services.trainer.settings import TrainerSettings  # noqa: E402
from services.trainer.versions import make_shadow, snapshot  # noqa: E402

BATCH = 100


class Running:
    def __init__(self) -> None:
        self.hr: list[float] = []
        self.ndcg: list[float] = []

    def add(self, figures: dict[str, np.ndarray]) -> None:
        self.hr += figures["hr@10"].tolist()
        self.ndcg += figures["ndcg@10"].tolist()

    def summary(self) -> dict[str, float]:
        return {
            "hr@10": float(np.mean(self.hr)),
            "ndcg@10": float(np.mean(self.ndcg)),
            "events": len(self.hr),
        }

    def series(self, every: int) -> list[list[float]]:
        c = np.cumsum(self.hr)
        return [[int(n), round(float(c[n - 1] / n), 5)] for n in range(every, len(self.hr) + 1, every)]


def make_learner(seed: int) -> tuple[Learner, TrainerSettings]:
    settings = TrainerSettings(text_features="off", seed=seed)
    learner = Learner(settings.learner_config(0))
    learner.add_items([(0, item) for item in datasets.read_items(data.ML100K / "u.item")])
    return learner, settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on a slice of the stream")
    parser.add_argument("--warmup-epochs", type=int, default=30, help="freshrec epochs over the warm-up half")
    parser.add_argument("--bpr-epochs", type=int, default=30, help="BPR-MF epochs over the warm-up half")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tempfile.tempdir = tempfile.mkdtemp(prefix="freshrec-bench-stream-")
    started = time.perf_counter()

    r = data.load()
    order = data.stream_order(r)
    users, items, times = r.user[order], r.item[order], r.time[order]
    n = len(order)
    half = n // 2
    end = n
    if args.quick:
        half, end = 8_000, 9_500
        args.warmup_epochs, args.bpr_epochs = 1, 1
    n_items = r.n_items
    events = [
        (k + 1, datasets.to_event(datasets.Rating(str(users[k]), str(items[k]), 4.0, float(times[k]))))
        for k in range(end)
    ]

    # -- warm-up --------------------------------------------------------------------------------
    learner, settings = make_learner(args.seed)
    t0 = time.perf_counter()
    sequences = learner.absorb_events(events[:half])
    learner.fit(learner.sequence_chunks(sequences, context=settings.pretrain_context), args.warmup_epochs)
    warmup_seconds = time.perf_counter() - t0
    checkpoint = to_bytes(learner)
    learner.shadows = {"live": make_shadow(learner, "warm-up", snapshot(learner))}

    history: dict[int, list[int]] = {}
    counts = np.zeros(n_items + 1)
    cooc = OnlineCooccurrence(n_items)
    for k in range(half):
        u, i = int(users[k]), int(items[k])
        cooc.add(history.get(u, []), i)
        history.setdefault(u, []).append(i)
        counts[i] += 1
    cooc.refresh()
    frozen_counts = counts.copy()
    frozen_sim = cooc.sim.copy()  # type: ignore[union-attr]
    bpr = BPR(r.n_users, n_items, seed=args.seed)
    optimizer = torch.optim.Adam(bpr.parameters(), lr=1e-3)
    pu = users[:half].astype(np.int64)
    pi = items[:half].astype(np.int64)
    for _ in range(args.bpr_epochs):
        bpr.step(pu, pi, optimizer)
    bpr_frozen = BPR(r.n_users, n_items, seed=args.seed)
    bpr_frozen.load_state_dict(bpr.state_dict())
    known_users = set(int(u) for u in pu)

    # -- the stream ---------------------------------------------------------------------------------
    run = {name: Running() for name in ("popularity", "item_knn", "bpr_mf")}
    frozen = {name: Running() for name in ("popularity", "item_knn", "bpr_mf")}
    freshrec_seconds = 0.0
    every = 500 if args.quick else 1000
    next_point = every
    curve_online: list[list[float]] = []
    curve_frozen: list[list[float]] = []
    for start in range(half, end, BATCH):
        stop = min(start + BATCH, end)
        bu, bi = users[start:stop].astype(np.int64), items[start:stop].astype(np.int64)
        excluded, hist_rows = [], np.zeros((stop - start, n_items + 1), dtype=np.float32)
        local: dict[int, list[int]] = {}
        for row, (u, i) in enumerate(zip(bu.tolist(), bi.tolist(), strict=True)):
            before = history.get(u, []) + local.get(u, [])
            excluded.append(np.array(before, dtype=np.int64))
            hist_rows[row, before] = 1.0
            local.setdefault(u, []).append(i)
        unknown = np.array([u not in known_users for u in bu.tolist()])
        scores = {
            "popularity": (
                np.broadcast_to(counts, hist_rows.shape),
                np.broadcast_to(frozen_counts, hist_rows.shape),
            ),
            "item_knn": (cooc.scores(hist_rows), (hist_rows @ frozen_sim).astype(np.float64)),
            "bpr_mf": (bpr.scores(bu), bpr_frozen.scores(np.where(unknown, 0, bu))),
        }
        for name, (online_scores, frozen_scores) in scores.items():
            run[name].add(rank(online_scores, bi, excluded, ks=(10,)))
            frozen[name].add(rank(frozen_scores, bi, excluded, ks=(10,)))

        t = time.perf_counter()
        learner.observe(events[start:stop], train=True)
        freshrec_seconds += time.perf_counter() - t
        p, f = learner.prequential, learner.shadow_figures.get("live")
        if f is not None and p.evaluated >= next_point:
            curve_online.append([p.evaluated, round(p.hr / p.evaluated, 5)])
            curve_frozen.append([f.evaluated, round(f.hr / f.evaluated, 5)])
            next_point += every

        # the baselines learn the batch
        for u, i in zip(bu.tolist(), bi.tolist(), strict=True):
            cooc.add(history.get(u, []), i)
            history.setdefault(u, []).append(i)
            counts[i] += 1
        cooc.refresh()
        bpr.grow_users(int(bu.max()))
        for _ in range(5):
            bpr.step(bu, bi, optimizer)

    fresh_online = learner.prequential
    fresh_frozen = learner.shadow_figures["live"]
    results: dict[str, dict[str, float]] = {
        "freshrec": {
            "hr@10": fresh_online.hr / fresh_online.evaluated,
            "ndcg@10": fresh_online.ndcg / fresh_online.evaluated,
            "events": fresh_online.evaluated,
        },
        "freshrec_frozen": {
            "hr@10": fresh_frozen.hr / fresh_frozen.evaluated,
            "ndcg@10": fresh_frozen.ndcg / fresh_frozen.evaluated,
            "events": fresh_frozen.evaluated,
        },
    }
    for name in run:
        results[name] = run[name].summary()
        results[f"{name}_frozen"] = frozen[name].summary()

    # -- learning throughput with the service's defaults --------------------------------------------
    fresh, _ = make_learner(args.seed)
    restore(fresh, checkpoint)
    rest = events[half:end]
    wall, cpu = time.perf_counter(), time.process_time()
    for s in range(0, len(rest), settings.micro_batch):
        fresh.observe(rest[s : s + settings.micro_batch], train=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    export_seconds = []
    for _ in range(3):
        export_seconds.append(export_learner(learner, None).seconds)

    # -- the report ---------------------------------------------------------------------------------
    print(
        f"\nProtocol B: MovieLens-100K, warm-up on {half} events, {results['freshrec']['events']} evaluated"
    )
    print(
        f"  {'model':<12}{'online HR@10':>14}{'frozen HR@10':>14}"
        f"{'online NDCG@10':>16}{'frozen NDCG@10':>16}{'ratio':>8}"
    )
    for name in ("freshrec", "popularity", "item_knn", "bpr_mf"):
        o, f = results[name], results[f"{name}_frozen"]
        print(
            f"  {name:<12}{o['hr@10']:>14.4f}{f['hr@10']:>14.4f}{o['ndcg@10']:>16.4f}{f['ndcg@10']:>16.4f}"
            f"{o['hr@10'] / f['hr@10']:>8.3f}"
        )
    best_baseline = max(results[k]["hr@10"] for k in ("popularity", "item_knn", "bpr_mf"))
    best_baseline_ndcg = max(results[k]["ndcg@10"] for k in ("popularity", "item_knn", "bpr_mf"))
    ratios = {
        "online_vs_frozen_hr@10": results["freshrec"]["hr@10"] / results["freshrec_frozen"]["hr@10"],
        "online_vs_frozen_ndcg@10": results["freshrec"]["ndcg@10"] / results["freshrec_frozen"]["ndcg@10"],
        "online_vs_best_online_baseline_hr@10": results["freshrec"]["hr@10"] / best_baseline,
        "online_vs_best_online_baseline_ndcg@10": results["freshrec"]["ndcg@10"] / best_baseline_ndcg,
    }
    throughput = {
        "events": len(rest),
        "micro_batch": settings.micro_batch,
        "events_per_second_wall": len(rest) / wall,
        "events_per_second_cpu": len(rest) / cpu,
        "export_seconds_median": statistics.median(export_seconds),
        "warmup_seconds": warmup_seconds,
        "protocol_b_freshrec_seconds": freshrec_seconds,
        # Peak RSS of this whole process (two learners and every baseline): a trainer's bound.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("\nRatios:", json.dumps({k: round(v, 3) for k, v in ratios.items()}))
    print(
        f"Learning throughput (online, micro-batch {settings.micro_batch}, 1 thread): "
        f"{throughput['events_per_second_wall']:.0f} events/s wall, "
        f"{throughput['events_per_second_cpu']:.0f} per CPU-second; "
        f"export + validation {throughput['export_seconds_median']:.2f} s; "
        f"peak RSS of the whole benchmark process {throughput['peak_rss_mb']:.0f} MB"
    )
    report: dict[str, Any] = {
        "protocol_b": results,
        "ratios": ratios,
        "throughput": throughput,
        "quick": args.quick,
        "seconds": time.perf_counter() - started,
        "headline": [
            "ratios.online_vs_frozen_hr@10",
            "ratios.online_vs_best_online_baseline_hr@10",
            "protocol_b.freshrec.hr@10",
            "protocol_b.freshrec_frozen.hr@10",
            "throughput.events_per_second_wall",
            "throughput.export_seconds_median",
            "throughput.peak_rss_mb",
        ],
        "series": {
            "freshrec_online_hr@10": curve_online,
            "freshrec_frozen_hr@10": curve_frozen,
            "popularity_online_hr@10": run["popularity"].series(every),
            "item_knn_online_hr@10": run["item_knn"].series(every),
            "bpr_mf_online_hr@10": run["bpr_mf"].series(every),
        },
    }
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
