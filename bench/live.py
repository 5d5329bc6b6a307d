"""The accuracy users get: a real stack driven only through the public gRPC API, on several kinds
of data, with baselines computed beside it on the identical stream and protocol.

For each stream (``--streams``; default: MovieLens-100K, Last.fm tagging, DIGINETICA sessions and
two synthetic worlds, see ``bench/recsys/streams.py``) and each batch size (``--batches``):

1. a fresh embedded stack (private nats-server, SQLite, the four services with their default
   settings; only ingestion's earliest accepted event time is lowered, as for any backfill);
2. the catalogue through ``UpsertItems``, the first half of the time-ordered events through
   ``IngestEvents`` (no pre-training step: the path a new user takes), then a wait until
   inference serves a model trained through them;
3. test-then-train: batch by batch, ``Recommend(k=10)`` for every event's user *before* the batch
   is ingested (a hit when the event's item is in the answer), then ``IngestEvents`` of the batch;
4. the trainer's own prequential figure over the same events (``GetTrainerStatus`` before and
   after), and Recommend latency during the run.

Baselines (``bench/recsys/online.py``) replay the same events with the same protocol in this
process, before the stack starts (they do not depend on timing): popularity, popularity decayed
over events, last-item transitions, online item-kNN, and SASRec trained on the warm-up and frozen.
Every ranker leaves out what the user touched before; streams keep each user's first touch of an
item only.

    .venv/bin/python bench/live.py                      # every stream, batches of 10 and 100
    .venv/bin/python bench/live.py --streams ml-100k --batches 10 --max-test-events 5000
    .venv/bin/python bench/live.py --quick              # a smoke run: small slices, no SASRec

Prints a table per stream, then one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from recsys import online, streams  # noqa: E402

from cli.stack import Stack  # noqa: E402
from freshrec.v1 import (  # noqa: E402
    event_pb2,
    feature_pb2,
    feature_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    item_pb2,
    trainer_pb2,
    trainer_pb2_grpc,
)

K = 10
SOURCE_NAMES = {
    v: n.removeprefix("RECOMMENDATION_SOURCE_").lower() for n, v in inference_pb2.RecommendationSource.items()
}
#: Ingestion refuses events before 2000 by default; every stream here is a backfill of history.
EARLIEST = "1950-01-01T00:00:00+00:00"


def log(message: str) -> None:
    print(message, flush=True)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- the client ------------------------------------------------------------------------------------


def to_event(n: int, stream: str, e: streams.Interaction) -> event_pb2.Event:
    event = event_pb2.Event(
        event_id=f"{stream}-{n}",
        user_id=e.user,
        item_id=e.item,
        type=event_pb2.EventType.Value(e.type),
        value=e.value,
    )
    event.occurred_at.FromNanoseconds(int(e.time * 1e9))
    return event


def to_item(it: streams.CatalogueItem) -> item_pb2.Item:
    item = item_pb2.Item(
        item_id=it.item_id, title=it.title, categories=list(it.categories), tags=list(it.tags)
    )
    if it.created_at:
        item.created_at.FromNanoseconds(int(it.created_at * 1e9))
    return item


@dataclass
class Served:
    """What the stack answered, per evaluated event."""

    ranks: list[int] = field(default_factory=list)
    new_user: list[bool] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)
    warmup_s: float = 0.0
    test_s: float = 0.0
    trainer: dict[str, float] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)


class Client:
    def __init__(self, stack: Stack) -> None:
        self.channels = {
            name: grpc.aio.insecure_channel(stack.address(name))
            for name in ("ingestion", "feature", "trainer", "inference")
        }
        self.ingestion = ingestion_pb2_grpc.IngestionServiceStub(self.channels["ingestion"])
        self.feature = feature_pb2_grpc.FeatureServiceStub(self.channels["feature"])
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(self.channels["trainer"])
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channels["inference"])

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()

    async def ingest(self, events: list[event_pb2.Event]) -> None:
        response = await self.ingestion.IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=events), timeout=60
        )
        if response.errors:
            raise RuntimeError(
                f"ingestion refused {len(response.errors)} events: {response.errors[0].reason}"
            )

    async def trainer_status(self) -> trainer_pb2.GetTrainerStatusResponse:
        return await self.trainer.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest(), timeout=30)

    async def served_through(self) -> int:
        info = await self.inference.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)
        return int(info.trained_through.stream_sequence) if info.model_version else 0


async def wait_for(what: str, check: Any, timeout_s: float, every_s: float = 1.0) -> float:
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what} not reached within {timeout_s:.0f}s")
        await asyncio.sleep(every_s)
    return time.monotonic() - start


def trainer_window(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The trainer's prequential HR@10 / NDCG@10 over the events between two status reads."""
    n0, n1 = before.get("prequential_evaluated", 0.0), after.get("prequential_evaluated", 0.0)
    if n1 <= n0:
        return {"evaluated": 0.0}
    out = {"evaluated": n1 - n0}
    for name in ("hr@10", "ndcg@10"):
        key = f"prequential_{name}"
        out[f"learner_{name}"] = (after.get(key, 0.0) * n1 - before.get(key, 0.0) * n0) / (n1 - n0)
    # What the trainer says the live version served (its export, scored on the same requests).
    s0, s1 = before.get("served_evaluated", 0.0), after.get("served_evaluated", 0.0)
    out["served_evaluated"] = s1 - s0
    for name in ("hr@10", "ndcg@10"):
        key = f"served_{name}"
        if s1 > s0:
            out[name] = (after.get(key, 0.0) * s1 - before.get(key, 0.0) * s0) / (s1 - s0)
    return out


async def drive(stack: Stack, stream: streams.Stream, warm: int, batch: int, limit: int) -> Served:
    client = Client(stack)
    served = Served()
    try:
        for start in range(0, len(stream.items), 500):
            response = await client.feature.UpsertItems(
                feature_pb2.UpsertItemsRequest(items=[to_item(i) for i in stream.items[start : start + 500]]),
                timeout=60,
            )
            if response.errors:
                raise RuntimeError(f"UpsertItems refused an item: {response.errors[0].reason}")
        events = [to_event(n, stream.name, e) for n, e in enumerate(stream.events)]
        t0 = time.monotonic()
        for start in range(0, warm, 1000):
            await client.ingest(events[start : min(start + 1000, warm)])
        log(f"  warm-up: {warm:,} events ingested in {time.monotonic() - t0:.1f}s; waiting for a model")

        async def covered() -> bool:
            return await client.served_through() >= warm

        served.warmup_s = (
            time.monotonic() - t0 + await wait_for("a model trained on the warm-up", covered, 1800)
        )
        log(f"  warm-up: a model trained through it is served after {served.warmup_s:.1f}s")
        before = dict((await client.trainer_status()).metrics)

        seen_users = {e.user for e in stream.events[:warm]}
        end = len(events) if not limit else min(len(events), warm + limit)
        t0 = time.monotonic()
        next_report = 0.1

        async def recommend(user: str) -> inference_pb2.RecommendResponse | None:
            started = time.perf_counter()
            try:
                answer = await client.inference.Recommend(
                    inference_pb2.RecommendRequest(user_id=user, k=K), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                served.errors[exc.code().name] += 1
                return None
            served.latencies_ms.append((time.perf_counter() - started) * 1000)
            return answer

        for start in range(warm, end, batch):
            part = range(start, min(start + batch, end))
            users = list(dict.fromkeys(stream.events[n].user for n in part))
            answers = dict(zip(users, await asyncio.gather(*(recommend(u) for u in users)), strict=True))
            for n in part:
                e = stream.events[n]
                answer = answers[e.user]
                ids = [i.item_id for i in answer.items] if answer else []
                served.ranks.append(ids.index(e.item) if e.item in ids else -1)
                served.new_user.append(e.user not in seen_users)
                served.source.append(
                    SOURCE_NAMES[answer.items[0].source] if answer and answer.items else "none"
                )
                if answer:
                    served.versions.add(answer.model_version)
            seen_users.update(users)
            await client.ingest([events[n] for n in part])
            done = (part.stop - warm) / (end - warm)
            if done >= next_report:
                hr = float(np.mean(np.asarray(served.ranks) >= 0))
                log(f"  test: {part.stop - warm:,}/{end - warm:,} events, served HR@10 so far {hr:.4f}")
                next_report += 0.1
        served.test_s = time.monotonic() - t0

        async def learned() -> bool:
            return (await client.trainer_status()).watermark.stream_sequence >= end

        await wait_for("the trainer learning the test events", learned, 600)
        served.trainer = trainer_window(before, dict((await client.trainer_status()).metrics))
    finally:
        await client.close()
    return served


def run_stack(
    stream: streams.Stream, warm: int, batch: int, limit: int, env: dict[str, dict[str, str]] | None = None
) -> Served:
    with tempfile.TemporaryDirectory(prefix="freshrec-live-") as tmp:
        stack = Stack(
            Path(tmp) / "data",
            ports={name: 0 for name in ("nats", "ingestion", "feature", "trainer", "inference")},
            extra_env={
                **(env or {}),
                "ingestion": {"FRESHREC_EARLIEST_TIME": EARLIEST, **(env or {}).get("ingestion", {})},
            },
            log_dir=Path(tmp) / "logs",
        )
        stack.start()
        try:
            served = asyncio.run(drive(stack, stream, warm, batch, limit))
            lines = (Path(tmp) / "logs" / "trainer.log").read_text(errors="replace").splitlines()
            for line in lines:
                if "bootstrap" in line or "rejected" in line or "rolling back" in line:
                    log(f"  trainer: {line[:200]}")
            return served
        except BaseException:
            for name in ("trainer", "inference"):
                lines = (Path(tmp) / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
                log(f"  last lines of the {name} log:\n    " + "\n    ".join(lines[-15:]))
            raise
        finally:
            stack.stop()


# -- figures ---------------------------------------------------------------------------------------


def figures_of(ranks: np.ndarray) -> dict[str, float]:
    o = online.Outcome(ranks)
    return {"hr@10": round(o.hr, 4), "ndcg@10": round(o.ndcg, 4), "events": int(len(ranks))}


def baselines_for(
    stream: streams.Stream, warm: int, batches: list[int], limit: int, no_sasrec: bool
) -> dict[int, dict[str, online.Outcome]]:
    index: dict[str, int] = {}
    for it in stream.items:
        index.setdefault(it.item_id, len(index))
    for e in stream.events:
        index.setdefault(e.item, len(index))
    users: dict[str, int] = {}
    events = [online.Event(users.setdefault(e.user, len(users)), index[e.item]) for e in stream.events]
    n = len(index)
    sasrec = None if no_sasrec else online.SASRecFrozen(n, log=log)
    out = {}
    for b in batches:
        rankers: list[online.Ranker] = [
            online.Popularity(n),
            *(online.DecayedPopularity(n, h) for h in (1_000, 10_000, 50_000)),
            online.Transitions(online.DecayedPopularity(n, 10_000)),
            online.ItemKNN(n, online.DecayedPopularity(n, 10_000)),
        ]
        if sasrec is not None:
            rankers.append(sasrec)
        t0 = time.monotonic()
        out[b] = online.replay(rankers, events, warm, b, limit=limit)
        log(f"  baselines, batches of {b}: {time.monotonic() - t0:.0f}s")
    return out


def summarise(
    stream: streams.Stream, warm: int, batch: int, served: Served, base: dict[str, online.Outcome]
) -> dict[str, Any]:
    ranks = np.asarray(served.ranks, dtype=np.int64)
    new = np.asarray(served.new_user, dtype=bool)
    sources = np.asarray(served.source)
    baselines = {name: figures_of(o.ranks) for name, o in base.items()}
    decayed = [name for name in baselines if name.startswith("decayed")]
    best_decayed = max(decayed, key=lambda n: baselines[n]["hr@10"])
    best = max(baselines, key=lambda n: baselines[n]["hr@10"])
    doc: dict[str, Any] = {
        "served": figures_of(ranks),
        "served_new_users": figures_of(ranks[new]),
        "served_returning_users": figures_of(ranks[~new]),
        "served_by_source": {s: figures_of(ranks[sources == s]) for s in sorted(set(served.source))},
        "baselines": baselines,
        "best_baseline": best,
        "best_decayed_popularity": best_decayed,
        "new_users_decayed_popularity": figures_of(base[best_decayed].ranks[new]),
        "trainer_reported": {k: round(v, 4) for k, v in served.trainer.items()},
        "recommend_p50_ms": round(percentile(served.latencies_ms, 50), 2),
        "recommend_p99_ms": round(percentile(served.latencies_ms, 99), 2),
        "recommend_errors": dict(served.errors),
        "model_versions_served": len(served.versions),
        "warmup_to_model_s": round(served.warmup_s, 1),
        "test_s": round(served.test_s, 1),
        "events_per_s": round(len(ranks) / served.test_s, 1) if served.test_s else 0.0,
    }
    hr = doc["served"]["hr@10"]
    doc["ratio_vs_best_baseline"] = (
        round(hr / baselines[best]["hr@10"], 3) if baselines[best]["hr@10"] else None
    )
    reported = served.trainer.get("hr@10")
    doc["ratio_served_vs_trainer"] = round(hr / reported, 3) if reported else None
    nd = doc["new_users_decayed_popularity"]["hr@10"]
    doc["ratio_new_users_vs_decayed_popularity"] = (
        round(doc["served_new_users"]["hr@10"] / nd, 3) if nd else None
    )
    return doc


def rolling(ranks: np.ndarray, window: int) -> list[list[float]]:
    if len(ranks) < window:
        return []
    hits = np.convolve((ranks >= 0).astype(float), np.ones(window) / window, mode="valid")
    step = max(1, len(hits) // 200)
    return [[float(x + window), round(float(hits[x]), 4)] for x in range(0, len(hits), step)]


def print_table(name: str, batch: int, doc: dict[str, Any]) -> None:
    log(f"\n{name}, batches of {batch}: HR@10 / NDCG@10 over {doc['served']['events']:,} events")
    log(f"  {'ranker':<48}{'HR@10':>9}{'NDCG@10':>9}")
    rows = [("freshrec, served live", doc["served"])]
    rows += [("  new users", doc["served_new_users"]), ("  returning users", doc["served_returning_users"])]
    rows += [(f"  answers led by {s}", f) for s, f in doc["served_by_source"].items()]
    rows += [("freshrec, trainer-reported (same events)", doc["trainer_reported"])]
    rows += list(doc["baselines"].items())
    for label, f in rows:
        hr, nd = f.get("hr@10", float("nan")), f.get("ndcg@10", float("nan"))
        log(f"  {label:<48}{hr:>9.4f}{nd:>9.4f}")
    log(
        f"  served / best baseline ({doc['best_baseline']}): {doc['ratio_vs_best_baseline']}; "
        f"served / trainer-reported: {doc['ratio_served_vs_trainer']}; "
        f"new users / decayed popularity: {doc['ratio_new_users_vs_decayed_popularity']}"
    )
    log(
        f"  Recommend p50 {doc['recommend_p50_ms']} ms, p99 {doc['recommend_p99_ms']} ms; "
        f"{doc['model_versions_served']} model versions served; warm-up to model {doc['warmup_to_model_s']}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default=",".join(streams.LOADERS), help="comma-separated stream names")
    parser.add_argument("--batches", default="10,100", help="comma-separated batch sizes")
    parser.add_argument(
        "--max-test-events",
        type=int,
        default=20_000,
        help="events evaluated per run after the warm-up (0: all)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="SERVICE:NAME=VALUE",
        help="a setting for one service (development only: the figures that count use the defaults)",
    )
    parser.add_argument("--no-sasrec", action="store_true", help="leave the SASRec baseline out (faster)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 warm-up and 300 test events")
    args = parser.parse_args()
    names = [s for s in args.streams.split(",") if s]
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.quick:
        names = names if args.streams != ",".join(streams.LOADERS) else ["synth-shop"]
        batches = batches[:1]
    env: dict[str, dict[str, str]] = {}
    for entry in args.env:
        service, _, setting = entry.partition(":")
        name, _, value = setting.partition("=")
        env.setdefault(service, {})[name] = value
    torch.set_num_threads(2)
    results: dict[str, Any] = {}
    series: dict[str, list[list[float]]] = {}
    t_all = time.monotonic()
    for name in names:
        stream = streams.load(name)
        if args.quick:
            stream.events = stream.events[:2_300]
        warm = len(stream.events) // 2 if not args.quick else 2_000
        limit = 300 if args.quick else args.max_test_events
        log(f"\n== {name}: {stream.description}; {json.dumps(stream.summary())}")
        base = baselines_for(stream, warm, batches, limit, args.quick or args.no_sasrec)
        results[name] = {"stream": stream.summary(), "warm_up_events": warm}
        for b in batches:
            log(f"  freshrec, batches of {b}: starting a stack")
            served = run_stack(stream, warm, b, limit, env)
            doc = summarise(stream, warm, b, served, base[b])
            results[name][f"batch_{b}"] = doc
            print_table(name, b, doc)
            series[f"{name}_b{b}_served_hr@10_rolling"] = rolling(np.asarray(served.ranks), 1000)
            best = doc["best_baseline"]
            series[f"{name}_b{b}_best_baseline_hr@10_rolling"] = rolling(base[b][best].ranks, 1000)
    summary: dict[str, Any] = {}
    for b in batches:
        ratios = [results[n][f"batch_{b}"]["ratio_vs_best_baseline"] for n in names]
        skew = [results[n][f"batch_{b}"]["ratio_served_vs_trainer"] for n in names]
        newr = [results[n][f"batch_{b}"]["ratio_new_users_vs_decayed_popularity"] for n in names]
        p99 = [results[n][f"batch_{b}"]["recommend_p99_ms"] for n in names]
        summary[f"batch_{b}"] = {
            "worst_ratio_vs_best_baseline": min((r for r in ratios if r is not None), default=None),
            "served_vs_trainer_range": [
                min((s for s in skew if s), default=None),
                max((s for s in skew if s), default=None),
            ],
            "worst_new_users_vs_decayed_popularity": min((r for r in newr if r is not None), default=None),
            "worst_recommend_p99_ms": max(p99) if p99 else None,
        }
    log(f"\nsummary: {json.dumps(summary)}  ({time.monotonic() - t_all:.0f}s in all)")
    headline = [f"summary.batch_{b}.worst_ratio_vs_best_baseline" for b in batches]
    headline += [f"summary.batch_{batches[0]}.worst_recommend_p99_ms"]
    headline += [f"{n}.batch_{batches[0]}.ratio_vs_best_baseline" for n in names][:5]
    print(
        json.dumps(
            {
                "summary": summary,
                **results,
                "series": series,
                "headline": headline,
                "quick": args.quick,
                "env": env,
            }
        )
    )


if __name__ == "__main__":
    main()
