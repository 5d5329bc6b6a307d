"""Forget latency: from ForgetUser to every service done (the served model without the user),
under light live load, and the traces of the forgotten users left on disk afterwards.

Starts the embedded stack (private NATS, SQLite, the four services) in a temporary folder, streams
synthetic events, gives each of a few users events of their own, waits until a model holds them,
then forgets them one after the other while the load goes on. Each forget is timed from the
request to ``GetForgetStatus.done`` (which needs inference to serve a version without the user).
After the stack has stopped, every file under its data and log folders is searched for each
forgotten id.

    .venv/bin/python bench/forget.py            # 5 forgets under 100 events/s
    .venv/bin/python bench/forget.py --quick    # 2 forgets

Prints a table, then one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
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
from freshrec.v1 import event_pb2, ingestion_pb2, ingestion_pb2_grpc  # noqa: E402


def event(user: str, item: str, event_id: str) -> event_pb2.Event:
    e = event_pb2.Event(event_id=event_id, user_id=user, item_id=item, type=event_pb2.EVENT_TYPE_CLICK)
    e.occurred_at.FromNanoseconds(time.time_ns())
    return e


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def held_by_a_model(models: Path, users: list[str]) -> bool:
    for path in (models / "versions").glob("*/user_ids.json"):
        if set(users) <= set(json.loads(path.read_text())):
            return True
    return False


async def measure(stack: Stack, data: Path, forgets: int, rate: float) -> dict[str, object]:
    world = SyntheticWorld(users=300, items=500, groups=4, categories=8, seed=2)
    channel = grpc.aio.insecure_channel(stack.address("ingestion"))
    stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
    stop = asyncio.Event()
    sent = 0

    async def load() -> None:
        nonlocal sent
        start = time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate) - sent
            if due > 0:
                events = to_events(world.events(due), "load", sent)
                await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events), timeout=30)
                sent += len(events)
            await asyncio.sleep(0.05)

    loader = asyncio.create_task(load())
    users = [f"forget-bench-{n}-{secrets.token_hex(6)}" for n in range(forgets)]
    mine = [event(u, f"load-i{k}", event_id=f"{u}-{k}") for u in users for k in range(12)]
    await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=mine), timeout=30)
    deadline = time.monotonic() + 180
    while not held_by_a_model(data / "models", users):
        if time.monotonic() > deadline:
            raise RuntimeError("no model held the users within 180 s")
        await asyncio.sleep(0.5)
    latencies: list[float] = []
    server_side: list[float] = []
    for user in users:
        started = time.monotonic()
        answer = await stub.ForgetUser(ingestion_pb2.ForgetUserRequest(user_id=user), timeout=10)
        request = ingestion_pb2.GetForgetStatusRequest(request_id=answer.request_id)
        while True:
            status = await stub.GetForgetStatus(request, timeout=10)
            if status.done:
                break
            if time.monotonic() - started > 300:
                raise RuntimeError(f"forget request {answer.request_id} not done in 300 s")
            await asyncio.sleep(0.1)
        latencies.append(time.monotonic() - started)
        server_side.append(
            (status.completed_at.ToMicroseconds() - status.requested_at.ToMicroseconds()) / 1e6
        )
    stop.set()
    await loader
    await channel.close()
    return {
        "forgets": len(latencies),
        "events_per_s": rate,
        "events_sent": sent,
        "forget_p50_s": round(percentile(latencies, 50), 2),
        "forget_max_s": round(max(latencies), 2),
        "forget_server_p50_s": round(percentile(server_side, 50), 2),
        "forget_server_max_s": round(max(server_side), 2),
        "latencies_s": [round(v, 2) for v in latencies],
        "_users": users,
    }


def traces(folder: Path, users: list[str]) -> list[str]:
    found = []
    needles = [u.encode() for u in users]
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if any(n in data for n in needles):
                found.append(str(path.relative_to(folder)))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (2 forgets)")
    parser.add_argument("--forgets", type=int, default=None, help="users forgotten (default 5; quick 2)")
    parser.add_argument("--rate", type=float, default=100.0, help="events per second of live load")
    args = parser.parse_args()
    forgets = args.forgets or (2 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="freshrec-bench-forget-") as tmp:
        root = Path(tmp)
        stack = Stack(
            root / "var",
            ports={"nats": 0, "ingestion": 0, "feature": 0, "trainer": 0, "inference": 0},
            extra_env={"trainer": {"FRESHREC_EXPORT_INTERVAL_S": "2"}},
            log_dir=root / "logs",
        )
        stack.start()
        try:
            figures = asyncio.run(measure(stack, root / "var", forgets, args.rate))
        finally:
            stack.stop()
        users = figures.pop("_users")
        assert isinstance(users, list)
        left = traces(root, users)
    figures = {
        "headline": ["forget_p50_s", "forget_max_s", "traces_found"],
        **figures,
        "traces_found": len(left),
        "trace_files": left,
        "trainer_export_interval_s": 2.0,
        "settle_s": 6.0,
    }
    print("forget latency (ForgetUser -> every service done, the served model without the user)")
    print(f"{'figure':<26} value")
    for key, value in figures.items():
        if key != "headline":
            print(f"{key:<26} {value}")
    print("(measured on a shared 2-core machine: other work competes for the CPU)")
    print(json.dumps(figures))
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
