"""Hide → unrecommended latency: how long after ``UpsertItems`` hides an item no inference replica
recommends it any more.

Starts the embedded stack (private NATS, SQLite, the four services, two inference replicas) in a
temporary folder, publishes a synthetic catalogue, streams events until every replica serves a
model, and keeps a steady live load of events flowing. Then, ``--hides`` times: picks the item
that is top-1 for the most probe users, keeps asking ``Recommend`` for every user who gets it in
their top 10, on every replica, in a loop, hides the item through ``FeatureService.UpsertItems``
and measures until every (user, replica) pair has answered without it. The latency of a hide is
the latest of those first clean answers minus the moment the hide was sent (an upper bound: an
answer is only seen when it comes back). Target: ≤ 1 s (docs/inference.md).

    .venv/bin/python bench/privacy.py            # 20 hides under 300 events/s
    .venv/bin/python bench/privacy.py --quick    # 5 hides under 50 events/s

Prints a table, then one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.demo import catalogue_items, to_events  # noqa: E402
from cli.stack import Stack  # noqa: E402
from cli.synthetic import SyntheticWorld  # noqa: E402
from freshrec.v1 import (  # noqa: E402
    feature_pb2,
    feature_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
)

TARGET_S = 1.0
PROBE_USERS = 40
K = 10


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Bench:
    def __init__(self, stack: Stack, world: SyntheticWorld) -> None:
        self.world = world
        self.channels = [
            grpc.aio.insecure_channel(a)
            for a in (stack.address("ingestion"), stack.address("feature"), *stack.addresses("inference"))
        ]
        self.ingest = ingestion_pb2_grpc.IngestionServiceStub(self.channels[0])
        self.feature = feature_pb2_grpc.FeatureServiceStub(self.channels[1])
        self.infer = [inference_pb2_grpc.InferenceServiceStub(c) for c in self.channels[2:]]
        self.sent = 0

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def send(self, n: int) -> None:
        events = to_events(self.world.events(n), "privacy", self.sent)
        response = await self.ingest.IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=events), timeout=30
        )
        if response.errors:
            raise RuntimeError(f"ingestion rejected events: {response.errors[0].reason}")
        self.sent += len(events)

    async def load(self, rate: float, stop: asyncio.Event) -> None:
        """A steady stream of events at ``rate`` per second until ``stop``."""
        start, done = time.monotonic(), self.sent
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate) - (self.sent - done)
            if due > 0:
                await self.send(due)
            await asyncio.sleep(0.05)

    async def until_served(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await self.send(500)
            infos = [await s.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=5) for s in self.infer]
            if all(i.model_version for i in infos):
                return infos[0].model_version
            await asyncio.sleep(0.5)
        raise RuntimeError(f"no model served on every inference replica within {timeout_s:.0f} s")

    async def top(self, stub: Any, user: str) -> list[str]:
        r = await stub.Recommend(inference_pb2.RecommendRequest(user_id=user, k=K), timeout=5)
        return [i.item_id for i in r.items]

    async def hide_one(self, users: list[str], hidden: set[str]) -> dict[str, Any] | None:
        tops = {u: await self.top(self.infer[0], u) for u in users}
        firsts = Counter(t[0] for t in tops.values() if t and t[0] not in hidden)
        if not firsts:
            return None
        item_id, _ = firsts.most_common(1)[0]
        probes = [u for u, t in tops.items() if item_id in t]
        entry = (await self.feature.GetItems(feature_pb2.GetItemsRequest(item_ids=[item_id]))).items[0]
        entry.hidden = True
        # (user, replica) -> receive time of its first answer without the item after the hide
        clean: dict[tuple[str, int], float] = {}
        requests = 0
        hid_at = 0.0

        async def ask(replica: int) -> None:
            nonlocal requests
            while len(clean) < len(probes) * len(self.infer):
                for user in probes:
                    sent = time.monotonic()
                    answer = await self.top(self.infer[replica], user)
                    requests += 1
                    if not hid_at or sent < hid_at:
                        continue  # asked before the hide: says nothing
                    if item_id in answer:
                        clean.pop((user, replica), None)  # served again: not done yet
                    else:
                        clean.setdefault((user, replica), time.monotonic())
                if time.monotonic() - hid_at > 30 and hid_at:
                    raise RuntimeError(f"{item_id} still recommended 30 s after it was hidden")

        async def hide() -> None:
            nonlocal hid_at
            await asyncio.sleep(0.2)  # the askers are running
            hid_at = time.monotonic()
            response = await self.feature.UpsertItems(
                feature_pb2.UpsertItemsRequest(items=[entry]), timeout=10
            )
            if response.errors:
                raise RuntimeError(f"hiding {item_id} was refused: {response.errors[0].reason}")

        await asyncio.gather(hide(), *(ask(r) for r in range(len(self.infer))))
        hidden.add(item_id)
        return {
            "item_id": item_id,
            "probe_users": len(probes),
            "requests": requests,
            "latency_s": max(clean.values()) - hid_at,
        }


async def measure(stack: Stack, hides: int, rate: float) -> dict[str, Any]:
    world = SyntheticWorld(users=300, items=400, groups=4, categories=6, seed=3)
    bench = Bench(stack, world)
    try:
        items = catalogue_items(world)
        await bench.feature.UpsertItems(feature_pb2.UpsertItemsRequest(items=items), timeout=30)
        version = await bench.until_served(timeout_s=120)
        stop = asyncio.Event()
        loader = asyncio.create_task(bench.load(rate, stop))
        users = world.sample_users(PROBE_USERS)
        hidden: set[str] = set()
        results = []
        started = time.monotonic()
        try:
            for _ in range(hides):
                result = await bench.hide_one(users, hidden)
                if result is None:
                    break
                results.append(result)
        finally:
            stop.set()
            await loader
        elapsed = time.monotonic() - started
        # Bring them back, so a rerun against a kept stack starts from the same catalogue.
        restore = (await bench.feature.GetItems(feature_pb2.GetItemsRequest(item_ids=sorted(hidden)))).items
        for entry in restore:
            entry.hidden = False
        if restore:
            await bench.feature.UpsertItems(feature_pb2.UpsertItemsRequest(items=list(restore)), timeout=30)
    finally:
        await bench.close()
    latencies = [r["latency_s"] for r in results]
    return {
        "hides": len(results),
        "hide_p50_s": round(percentile(latencies, 50), 3),
        "hide_p95_s": round(percentile(latencies, 95), 3),
        "hide_max_s": round(max(latencies), 3) if latencies else float("nan"),
        "hide_mean_s": round(statistics.fmean(latencies), 3) if latencies else float("nan"),
        "target_s": TARGET_S,
        "within_target": bool(latencies) and max(latencies) <= TARGET_S,
        "inference_replicas": len(bench.infer),
        "probe_users_mean": round(statistics.fmean(r["probe_users"] for r in results), 1) if results else 0,
        "recommend_requests": sum(r["requests"] for r in results),
        "events_per_s": round(rate, 1),
        "events_sent": bench.sent,
        "first_model": version,
        "seconds_hiding": round(elapsed, 1),
        "per_hide": [[r["item_id"], r["probe_users"], round(r["latency_s"], 3)] for r in results],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--hides", type=int, default=None, help="items to hide (default 20; quick 5)")
    parser.add_argument("--rate", type=float, default=None, help="live events per second (300; quick 50)")
    args = parser.parse_args()
    hides = args.hides or (5 if args.quick else 20)
    rate = args.rate if args.rate is not None else (50.0 if args.quick else 300.0)
    with tempfile.TemporaryDirectory(prefix="freshrec-bench-privacy-") as tmp:
        stack = Stack(
            Path(tmp) / "var",
            ports={"nats": 0, "ingestion": 0, "feature": 0, "trainer": 0, "inference": 0},
            replicas={"inference": 2},
            extra_env={"trainer": {"FRESHREC_EXPORT_INTERVAL_S": "3"}},
            log_dir=Path(tmp) / "logs",
        )
        stack.start()
        try:
            figures = asyncio.run(measure(stack, hides, rate))
        finally:
            stack.stop()
    figures = {"headline": ["hide_p50_s", "hide_max_s", "hides", "within_target", "events_per_s"], **figures}
    print("hide -> unrecommended latency (no inference replica recommends a hidden item)")
    print(f"{'figure':<22} value")
    for key, value in figures.items():
        if key not in ("per_hide", "headline"):
            print(f"{key:<22} {value}")
    print(f"{'item':<14} {'probe users':>11} {'latency s':>10}")
    for item_id, probes, latency in figures["per_hide"]:
        print(f"{item_id:<14} {probes:>11} {latency:>10.3f}")
    print("(measured on a shared 2-core machine: other work competes for the CPU)")
    print(json.dumps(figures))
    return 0 if figures["hides"] else 1


if __name__ == "__main__":
    sys.exit(main())
