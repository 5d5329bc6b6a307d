"""Event → served-model lag: how long after ingestion accepts an event every inference replica
serves a model trained on it.

Starts the embedded stack (private NATS, SQLite, the four services, two inference replicas) in a
temporary folder, streams synthetic events at a steady rate, and once a second sends a probe event
stamped with the current time. A probe counts as served when every inference replica's
``GetModelInfo.trained_through.event_time`` has reached it; its lag is that moment minus the
moment ingestion acknowledged it. Trainer settings are the defaults (export every 10 s) unless
``--export-interval`` says otherwise.

    .venv/bin/python bench/freshness.py            # 120 s of load
    .venv/bin/python bench/freshness.py --quick    # a short smoke run (exports every 2 s)

Prints a table, then one JSON object on its last line (with the lag series for plotting).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.demo import to_events  # noqa: E402
from cli.stack import Stack  # noqa: E402
from cli.synthetic import SyntheticWorld  # noqa: E402
from freshrec.v1 import (  # noqa: E402
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def measure(stack: Stack, duration_s: float, rate: float, settle_s: float) -> dict[str, object]:
    world = SyntheticWorld(users=500, items=1000, groups=4, categories=8, seed=1)
    ingest_channel = grpc.aio.insecure_channel(stack.address("ingestion"))
    ingest = ingestion_pb2_grpc.IngestionServiceStub(ingest_channel)
    infer_channels = [grpc.aio.insecure_channel(a) for a in stack.addresses("inference")]
    infer = [inference_pb2_grpc.InferenceServiceStub(c) for c in infer_channels]
    probes: list[tuple[float, float, float]] = []  # (t since start, occurred_at, acked monotonic)
    lags: dict[int, float] = {}
    sent = 0
    versions: set[str] = set()
    start = time.monotonic()

    async def load() -> None:
        nonlocal sent
        next_probe = start
        while time.monotonic() - start < duration_s:
            now = time.monotonic()
            due = int((now - start) * rate) - sent
            if due > 0:
                events = to_events(world.events(due), "fresh", sent)
                response = await ingest.IngestEvents(
                    ingestion_pb2.IngestEventsRequest(events=events), timeout=30
                )
                if response.errors:
                    raise RuntimeError(f"ingestion rejected events: {response.errors[0].reason}")
                sent += len(events)
                if now >= next_probe:
                    last = events[-1].occurred_at
                    probes.append((now - start, last.seconds + last.nanos / 1e9, time.monotonic()))
                    next_probe += 1.0
            await asyncio.sleep(0.05)

    async def watch() -> None:
        deadline = start + duration_s + settle_s
        while time.monotonic() < deadline:
            infos = await asyncio.gather(
                *(s.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=5) for s in infer)
            )
            now = time.monotonic()
            versions.update(i.model_version for i in infos if i.model_version)
            covered = min(
                (i.trained_through.event_time.seconds + i.trained_through.event_time.nanos / 1e9)
                if i.model_version
                else 0.0
                for i in infos
            )
            for n, (_t, occurred, acked) in enumerate(probes):
                if n not in lags and covered >= occurred:
                    lags[n] = now - acked
            if time.monotonic() - start > duration_s and len(lags) == len(probes):
                return
            await asyncio.sleep(0.1)

    await asyncio.gather(load(), watch())
    for channel in [ingest_channel, *infer_channels]:
        await channel.close()
    values = [lags[n] for n in sorted(lags)]
    return {
        "probes": len(probes),
        "probes_served": len(lags),
        "events_sent": sent,
        "events_per_s": round(sent / duration_s, 1),
        "inference_replicas": len(infer),
        "model_versions_served": len(versions),
        "lag_p50_s": round(percentile(values, 50), 3),
        "lag_p95_s": round(percentile(values, 95), 3),
        "lag_max_s": round(max(values), 3) if values else float("nan"),
        "lag_mean_s": round(statistics.fmean(values), 3) if values else float("nan"),
        "series": {
            "event_to_served_model_lag_s": [[round(probes[n][0], 2), round(lags[n], 3)] for n in sorted(lags)]
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--duration", type=float, default=None, help="seconds of load (default 120; quick 8)")
    parser.add_argument("--rate", type=float, default=300.0, help="events per second")
    parser.add_argument("--export-interval", type=float, default=None, help="trainer export interval (s)")
    args = parser.parse_args()
    duration = args.duration or (8.0 if args.quick else 120.0)
    export_interval = args.export_interval or (2.0 if args.quick else None)
    trainer_env = {"FRESHREC_EXPORT_INTERVAL_S": str(export_interval)} if export_interval else {}
    with tempfile.TemporaryDirectory(prefix="freshrec-bench-freshness-") as tmp:
        stack = Stack(
            Path(tmp) / "var",
            ports={"nats": 0, "ingestion": 0, "feature": 0, "trainer": 0, "inference": 0},
            replicas={"inference": 2},
            extra_env={"trainer": trainer_env},
            log_dir=Path(tmp) / "logs",
        )
        stack.start()
        try:
            figures = asyncio.run(measure(stack, duration, args.rate, settle_s=30.0 if args.quick else 90.0))
        finally:
            stack.stop()
    figures = {
        "headline": [
            "lag_p50_s",
            "lag_p95_s",
            "lag_max_s",
            "probes_served",
            "events_per_s",
            "model_versions_served",
        ],
        "duration_s": duration,
        "trainer_export_interval_s": export_interval or "default",
        **figures,
    }
    print("event -> served-model lag (every inference replica serving a model trained on the event)")
    print(f"{'figure':<28} value")
    for key, value in figures.items():
        if key not in ("series", "headline"):
            print(f"{key:<28} {value}")
    print("(measured on a shared 2-core machine: other work competes for the CPU)")
    print(json.dumps(figures))
    return 0 if figures["probes_served"] else 1


if __name__ == "__main__":
    sys.exit(main())
