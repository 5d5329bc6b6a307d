"""Ingestion throughput, end to end: an event counts once it is committed to SQL and acknowledged by
JetStream in FRESHREC_EVENTS.

Runs a private nats-server and the real ingestion service (``python -m services.ingestion``, SQLite
in WAL mode) as subprocesses, with load generators as separate processes:

1. raw: nats-py JetStream ``publish_async`` (``Nats-Msg-Id`` on every message, 2,000 in flight) of
   the same event payloads into a stream of its own: the ceiling a Python publisher reaches here;
2. grpc: 4 producers calling ``IngestEvents`` with batches of 500, each waiting for its answer;
3. nats: 4 producers publishing ``IngestEventsRequest`` batches of 500 on ``freshrec.events.raw``.

Each phase runs for ``--seconds`` (30 by default; ``--quick`` runs 3). Throughput is read off the
stream: events that reached FRESHREC_EVENTS per second during the phase. At the end every accepted
event must be in the stream exactly once, and the ingestion process's RSS is read from /proc.
Prints a table, then one JSON object on the last line. Writes only to a temporary folder.

    .venv/bin/python bench/ingest.py [--quick] [--seconds 30] [--producers 4] [--batch 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import nats  # noqa: E402
from nats.js.api import StorageType, StreamConfig  # noqa: E402

from cli.stack import NatsServer, free_port, wait_healthy  # noqa: E402
from freshrec.v1 import event_pb2, ingestion_pb2, ingestion_pb2_grpc  # noqa: E402
from shared.nats import EVENTS_STREAM, MSG_ID_HEADER, RAW_SUBJECT  # noqa: E402

RAW_BENCH_STREAM = "BENCH_RAW"
RAW_STREAM = "FRESHREC_RAW"
RAW_CONSUMER = "ingestion-raw"
#: Raw messages (batches) the NATS producers let wait for ingestion before they pause.
MAX_RAW_BACKLOG = 16
BATCH_TYPE = ingestion_pb2.IngestEventsRequest.DESCRIPTOR.full_name
TYPES = [event_pb2.EVENT_TYPE_VIEW, event_pb2.EVENT_TYPE_CLICK, event_pb2.EVENT_TYPE_PURCHASE]


def make_event(producer: str, n: int, now_s: float) -> event_pb2.Event:
    """A typical event (about 120 bytes on the wire)."""
    event = event_pb2.Event(
        event_id=f"{producer}-{n:010d}",
        user_id=f"user-{(n * 7919) % 50_000}",
        item_id=f"item-{(n * 104_729) % 20_000}",
        type=TYPES[n % len(TYPES)],
        value=1.0,
        session_id=f"s-{n // 40}",
    )
    event.context["device"] = "web"
    event.occurred_at.FromNanoseconds(int(now_s * 1e9))
    return event


def make_batch(producer: str, start: int, size: int) -> ingestion_pb2.IngestEventsRequest:
    now = time.time()
    return ingestion_pb2.IngestEventsRequest(
        events=[make_event(producer, start + i, now) for i in range(size)]
    )


# -- load generators (separate processes) -----------------------------------------------------------


async def ready_set_go() -> None:
    """Tells the orchestrator this process is ready, then waits for its signal to start."""
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)


async def grpc_producer(args: argparse.Namespace) -> dict[str, Any]:
    accepted = duplicates = errors = calls = 0
    sent = 0
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        await channel.channel_ready()
        await ready_set_go()
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            request = make_batch(args.name, sent, args.batch)
            response = await stub.IngestEvents(request, timeout=60)
            sent += args.batch
            calls += 1
            accepted += response.accepted
            duplicates += response.duplicates
            errors += len(response.errors)
    return {"sent": sent, "accepted": accepted, "duplicates": duplicates, "errors": errors, "calls": calls}


async def nats_producer(args: argparse.Namespace) -> dict[str, Any]:
    """Publishes batches on freshrec.events.raw as fast as ingestion takes them.

    Like the gRPC producers, which wait for each answer, these keep a bounded amount of work
    outstanding: they pause while the raw consumer has more than ``MAX_RAW_BACKLOG`` messages
    not yet delivered (with ``--nats-offered`` they also keep to that pace).
    """
    nc = await nats.connect(args.target)
    js = nc.jetstream()
    sent = 0
    pending: list[Any] = []
    await ready_set_go()
    start = time.monotonic()
    deadline = start + args.seconds
    while time.monotonic() < deadline:
        due = start + sent / args.rate if args.rate > 0 else 0.0
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        while time.monotonic() < deadline:
            info = await js.consumer_info(RAW_STREAM, RAW_CONSUMER)
            if info.num_pending <= MAX_RAW_BACKLOG:
                break
            await asyncio.sleep(0.02)
        data = make_batch(args.name, sent, args.batch).SerializeToString()
        pending.append(
            await js.publish_async(
                RAW_SUBJECT,
                data,
                headers={"Freshrec-Message-Type": BATCH_TYPE, MSG_ID_HEADER: f"{args.name}-{sent}"},
            )
        )
        sent += args.batch
        if len(pending) >= 2:
            await pending.pop(0)
    await asyncio.gather(*pending)
    await nc.close()
    return {"sent": sent}


async def raw_publisher(args: argparse.Namespace) -> dict[str, Any]:
    """nats-py publish_async of the same payloads with Nats-Msg-Id, 2,000 in flight."""
    nc = await nats.connect(args.target, pending_size=32 * 1024 * 1024)
    js = nc.jetstream(publish_async_max_pending=2000)
    now = time.time()
    payloads = [make_event("raw", n, now) for n in range(20_000)]
    bodies = [(e.event_id, e.SerializeToString()) for e in payloads]
    await ready_set_go()
    sent = 0
    timeline: list[tuple[float, int]] = []
    start = time.monotonic()
    deadline = start + args.seconds
    next_mark = start + 1.0
    futures: list[Any] = []
    while time.monotonic() < deadline:
        for event_id, body in bodies[:1000]:
            futures.append(
                await js.publish_async(
                    "bench.raw.click",
                    body,
                    headers={MSG_ID_HEADER: f"{event_id}-{sent}"},
                    stream=RAW_BENCH_STREAM,
                )
            )
            sent += 1
        if len(futures) >= 2000:
            await asyncio.gather(*futures)
            futures = []
        if time.monotonic() >= next_mark:
            timeline.append((round(time.monotonic() - start, 2), sent))
            next_mark += 1.0
    await asyncio.gather(*futures)
    elapsed = time.monotonic() - start
    await nc.close()
    return {"sent": sent, "seconds": elapsed, "rate": sent / elapsed, "timeline": timeline}


ROLES = {"grpc-producer": grpc_producer, "nats-producer": nats_producer, "raw": raw_publisher}


# -- the orchestrator -------------------------------------------------------------------------------


def spawn_role(role: str, target: str, name: str, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--role",
            role,
            "--target",
            target,
            "--name",
            name,
            "--seconds",
            str(args.seconds),
            "--batch",
            str(args.batch),
            "--rate",
            str(args.nats_offered / args.producers if args.nats_offered else 0.0),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )


def start_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """Waits until every load generator is ready, then starts them together."""
    for process in processes:
        assert process.stdout is not None
        line = process.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"a load generator did not start: {line!r}")
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.flush()


def collect(process: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert process.stdout is not None
    out = process.stdout.read()
    process.wait(timeout=600)
    if process.returncode != 0:
        raise RuntimeError(f"a load generator failed with code {process.returncode}")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


def proc_stat(pid: int) -> tuple[float, float]:
    """(RSS in MB, CPU seconds) of a process."""
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return rss_kb / 1024, cpu


async def stream_messages(js: Any, stream: str) -> int:
    info = await js.stream_info(stream)
    return int(info.state.messages)


async def watch(js: Any, seconds: float, until_total: int | None = None) -> tuple[list[list[float]], float]:
    """Samples FRESHREC_EVENTS every second for ``seconds``; returns [[t, events/s]] and the rate."""
    series: list[list[float]] = []
    start_count = await stream_messages(js, EVENTS_STREAM)
    start = time.monotonic()
    last_t, last_n = start, start_count
    while time.monotonic() - start < seconds:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        n = await stream_messages(js, EVENTS_STREAM)
        series.append([round(now - start, 1), round((n - last_n) / (now - last_t))])
        last_t, last_n = now, n
    rate = (last_n - start_count) / (last_t - start)
    return series, rate


async def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="freshrec-bench-ingest-"))
    nats_server = NatsServer(tmp / "nats")
    nats_server.start()
    ingestion: subprocess.Popen[bytes] | None = None
    try:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name=RAW_BENCH_STREAM,
                subjects=["bench.raw.>"],
                storage=StorageType.FILE,
                duplicate_window=120,
            )
        )

        # 1. The ceiling: raw publish_async of the same payloads.
        raw_process = spawn_role("raw", nats_server.url, "raw", args)
        await asyncio.to_thread(start_all, [raw_process])
        raw = collect(raw_process)
        await js.delete_stream(RAW_BENCH_STREAM)

        # 2. and 3. The real service.
        port = free_port()
        metrics_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
        env.update(
            {
                "FRESHREC_NATS__URL": nats_server.url,
                "FRESHREC_GRPC__HOST": "127.0.0.1",
                "FRESHREC_GRPC__PORT": str(port),
                "FRESHREC_DATABASE__URL": f"sqlite:///{tmp / 'ingestion.db'}",
                "FRESHREC_METRICS__HOST": "127.0.0.1",
                "FRESHREC_METRICS__PORT": str(metrics_port),
                "FRESHREC_LOG__LEVEL": "INFO",
                "FRESHREC_REPLICA_NAME": "bench",
            }
        )
        log_file = (tmp / "ingestion.log").open("wb")
        ingestion = subprocess.Popen(
            [sys.executable, "-m", "services.ingestion"],
            env=env,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        await asyncio.to_thread(wait_healthy, f"127.0.0.1:{port}", 60.0, ingestion)
        _, cpu_start = proc_stat(ingestion.pid)

        producers = [
            spawn_role("grpc-producer", f"127.0.0.1:{port}", f"g{p}", args) for p in range(args.producers)
        ]
        await asyncio.to_thread(start_all, producers)
        grpc_series, grpc_rate = await watch(js, args.seconds)
        grpc_results = [collect(p) for p in producers]
        grpc_accepted = sum(r["accepted"] for r in grpc_results)
        await wait_for_stream(js, grpc_accepted, 60)
        _, cpu_mid = proc_stat(ingestion.pid)
        grpc_cpu_us = (cpu_mid - cpu_start) / max(1, grpc_accepted) * 1e6

        base = await stream_messages(js, EVENTS_STREAM)
        producers = [
            spawn_role("nats-producer", nats_server.url, f"n{p}", args) for p in range(args.producers)
        ]
        await asyncio.to_thread(start_all, producers)
        nats_series, nats_rate = await watch(js, args.seconds)
        nats_sent = sum(collect(p)["sent"] for p in producers)
        drain_start = time.monotonic()
        await wait_for_stream(js, base + nats_sent, 120)
        nats_drain_s = time.monotonic() - drain_start
        rss_mb, cpu_end = proc_stat(ingestion.pid)
        nats_cpu_us = (cpu_end - cpu_mid) / max(1, nats_sent) * 1e6

        total = await stream_messages(js, EVENTS_STREAM)
        expected = grpc_accepted + nats_sent
        diagnostics = scrape(metrics_port)
        await nc.close()
    finally:
        if ingestion is not None:
            ingestion.terminate()
            try:
                ingestion.wait(30)
            except subprocess.TimeoutExpired:
                ingestion.kill()
        nats_server.stop()
    return {
        "headline": [
            "grpc_events_per_s",
            "nats_events_per_s",
            "raw_publish_async_msgs_per_s",
            "ratio_grpc_to_raw",
            "ratio_nats_to_raw",
            "ingestion_rss_mb",
            "ingestion_cpu_us_per_event_grpc",
            "exactly_once",
        ],
        "seconds_per_phase": args.seconds,
        "producers": args.producers,
        "batch": args.batch,
        "raw_publish_async_msgs_per_s": round(raw["rate"]),
        "grpc_events_per_s": round(grpc_rate),
        "nats_events_per_s": round(nats_rate),
        "ratio_grpc_to_raw": round(grpc_rate / raw["rate"], 3),
        "ratio_nats_to_raw": round(nats_rate / raw["rate"], 3),
        "grpc_accepted": grpc_accepted,
        "grpc_rejected": sum(r["errors"] for r in grpc_results),
        "nats_sent": nats_sent,
        "nats_drain_after_load_s": round(nats_drain_s, 2),
        "events_in_stream": total,
        "events_expected": expected,
        "exactly_once": total == expected,
        "ingestion_cpu_us_per_event_grpc": round(grpc_cpu_us, 1),
        "ingestion_cpu_us_per_event_nats": round(nats_cpu_us, 1),
        "ingestion_rss_mb": round(rss_mb, 1),
        "diagnostics": diagnostics,
        "series": {
            "grpc_events_per_s": grpc_series,
            "nats_events_per_s": nats_series,
            "raw_msgs_per_s": rate_series(raw["timeline"]),
        },
    }


def scrape(port: int) -> dict[str, float]:
    """A few of the service's own metrics: how commits and publishes behaved."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = {
        "freshrec_ingestion_commit_seconds_count": "commits",
        "freshrec_ingestion_commit_seconds_sum": "commit_seconds_total",
        "freshrec_ingestion_commit_rows_sum": "committed_rows",
        "freshrec_ingestion_publish_latency_seconds_count": "publish_batches",
        "freshrec_ingestion_publish_latency_seconds_sum": "publish_seconds_total",
    }
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[wanted[sample.name]] = round(sample.value, 3)
            elif sample.name in (
                "freshrec_ingestion_events_published_total",
                "freshrec_ingestion_publish_failures_total",
            ):
                out[f"{sample.name.removeprefix('freshrec_ingestion_')}_{sample.labels['path']}"] = (
                    sample.value
                )
    return out


def rate_series(timeline: list[list[float]]) -> list[list[float]]:
    out: list[list[float]] = []
    last_t, last_n = 0.0, 0
    for t, n in timeline:
        if t > last_t:
            out.append([t, round((n - last_n) / (t - last_t))])
        last_t, last_n = t, n
    return out


async def wait_for_stream(js: Any, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await stream_messages(js, EVENTS_STREAM) >= expected:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"FRESHREC_EVENTS did not reach {expected} events within {timeout_s}s")


def print_table(result: dict[str, Any]) -> None:
    rows = [
        ("raw nats-py publish_async (msgs/s)", result["raw_publish_async_msgs_per_s"], ""),
        ("gRPC IngestEvents, end to end (events/s)", result["grpc_events_per_s"], "target >= 20,000"),
        ("NATS freshrec.events.raw, end to end (events/s)", result["nats_events_per_s"], "target >= 20,000"),
        ("ratio gRPC / raw", result["ratio_grpc_to_raw"], "target >= 0.5"),
        ("ratio NATS / raw", result["ratio_nats_to_raw"], "target >= 0.5"),
        ("ingestion CPU per event, gRPC (us)", result["ingestion_cpu_us_per_event_grpc"], ""),
        ("ingestion CPU per event, NATS (us)", result["ingestion_cpu_us_per_event_nats"], ""),
        ("ingestion RSS at the end (MB)", result["ingestion_rss_mb"], "target <= 300"),
        ("every accepted event in the stream once", result["exactly_once"], ""),
    ]
    print(
        f"ingestion benchmark: {result['producers']} producers, batches of {result['batch']}, "
        f"{result['seconds_per_phase']} s per phase"
    )
    for name, value, note in rows:
        print(f"  {name:<50} {value!s:>12}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 s per phase (a smoke run)")
    parser.add_argument("--seconds", type=float, default=30.0, help="duration of each phase")
    parser.add_argument("--producers", type=int, default=4, help="concurrent load generator processes")
    parser.add_argument("--batch", type=int, default=500, help="events per request / NATS message")
    parser.add_argument(
        "--nats-offered",
        type=float,
        default=0.0,
        help="cap on the events/s the NATS producers offer together (default: as fast as ingestion takes)",
    )
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="p", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        print(json.dumps(asyncio.run(ROLES[args.role](args))))
        return
    if args.quick:
        args.seconds = 3.0
    result = asyncio.run(orchestrate(args))
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
