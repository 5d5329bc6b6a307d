"""Losing the trainer's host: three hosts (network namespaces on one bridge), a NATS JetStream node
on each, the services spread over them, live load, then one host lost: every process on it killed
at once (``kill``), or the host cut off the bridge with its processes running on, then healed
(``partition``).

    host a: NATS, trainer (leads)
    host b: NATS, trainer (stands by), feature
    host c: NATS, ingestion, inference (models from the Object Store: no disk shared with a or b)

Events go to ingestion and Recommend calls to inference from this machine, at fixed rates. Once a
model is served, host a is lost. Measured: events lost and duplicated (every acknowledged id
looked up in FRESHREC_EVENTS, giving ingestion's outbox a minute to drain once the load stops; the
leader at the end must have learned exactly the stream), Recommend success during the fault, time
until the standby leads and until inference serves a version the new leader exported, and how long
an inference replica started afterwards on host b (a new host, empty disk) takes to serve the live
model from the Object Store.

    .venv/bin/python bench/hosts.py            # 300 events/s, 200 Recommend/s, 60 s after the kill
    .venv/bin/python bench/hosts.py --quick    # 100 events/s, 50 Recommend/s, 25 s

Needs root (network namespaces). Prints a table, then one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nats  # noqa: E402
import nats.js.errors  # noqa: E402
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy  # noqa: E402

from cli.hosts import Hosts, start_freshrec  # noqa: E402
from cli.stack import wait_healthy  # noqa: E402
from freshrec.v1 import (  # noqa: E402
    event_pb2,
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from shared.nats import EVENTS_STREAM, MSG_ID_HEADER  # noqa: E402

#: A small model, so that exports (and so a new leader's first version) take seconds here.
TRAINER = {
    "FRESHREC_DIM": "16",
    "FRESHREC_MAX_HISTORY": "10",
    "FRESHREC_BLOCKS": "1",
    "FRESHREC_TEXT_FEATURES": "off",
    "FRESHREC_EXPORT_INTERVAL_S": "5",
    "FRESHREC_EXPORT_EVERY_EVENTS": "1000000",
    "FRESHREC_LEASE_TTL_S": "5",
    "FRESHREC_GATE": "false",
    "FRESHREC_TORCH_THREADS": "1",
}


@dataclass
class Load:
    sent: int = 0
    acked: set[str] = field(default_factory=set)
    failed_calls: int = 0
    recommend_ok: list[float] = field(default_factory=list)  # times of successful calls
    recommend_failed: list[float] = field(default_factory=list)
    served: list[tuple[float, str]] = field(default_factory=list)  # (time, model version) of answers


async def produce(address: str, rate: float, stop: asyncio.Event, load: Load, run: str) -> None:
    rng = random.Random(1)
    batch = 10
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        next_at = time.monotonic()
        while not stop.is_set():
            events = []
            for _ in range(batch):
                load.sent += 1
                user = f"u{rng.randrange(300)}"
                item = f"i{(int(user[1:]) % 10) * 10 + rng.randrange(12)}"
                e = event_pb2.Event(
                    event_id=f"{run}-{load.sent}", user_id=user, item_id=item, type=event_pb2.EVENT_TYPE_CLICK
                )
                e.occurred_at.FromNanoseconds(time.time_ns())
                events.append(e)
            while not stop.is_set():  # a batch is retried until acknowledged (ids make it idempotent)
                try:
                    await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events), timeout=10)
                    load.acked.update(e.event_id for e in events)
                    break
                except grpc.aio.AioRpcError:
                    load.failed_calls += 1
                    await asyncio.sleep(0.2)
            next_at += batch / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def recommend(address: str, rate: float, stop: asyncio.Event, load: Load) -> None:
    rng = random.Random(2)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        async def one() -> None:
            try:
                answer = await stub.Recommend(
                    inference_pb2.RecommendRequest(user_id=f"u{rng.randrange(300)}", k=10), timeout=2
                )
                load.recommend_ok.append(time.monotonic())
                load.served.append((time.monotonic(), answer.model_version))
            except grpc.aio.AioRpcError:
                load.recommend_failed.append(time.monotonic())

        tasks: set[asyncio.Task[None]] = set()
        next_at = time.monotonic()
        while not stop.is_set():
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*tasks, return_exceptions=True)


async def trainer_status(address: str) -> trainer_pb2.GetTrainerStatusResponse | None:
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            return await trainer_pb2_grpc.TrainerServiceStub(channel).GetTrainerStatus(
                trainer_pb2.GetTrainerStatusRequest(), timeout=3
            )
    except grpc.aio.AioRpcError:
        return None


async def model_of(address: str) -> str:
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            info = await inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(
                inference_pb2.GetModelInfoRequest(), timeout=3
            )
            return info.model_version
    except grpc.aio.AioRpcError:
        return ""


async def until(check: Any, timeout_s: float, what: str) -> float:
    """Seconds until ``check()`` (async) is truthy."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")


async def stream_ids(nats_url: str) -> dict[str, int]:
    """Event id → copies in FRESHREC_EVENTS (read with an ephemeral consumer)."""
    nc = await nats.connect(nats_url.split(",")[0])
    try:
        js = nc.jetstream()
        info = await js.stream_info(EVENTS_STREAM)
        last = info.state.last_seq
        psub = await js.pull_subscribe(
            "freshrec.events.accepted.>",
            stream=EVENTS_STREAM,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, mem_storage=True
            ),
        )
        counts: dict[str, int] = {}
        seen = 0
        while seen < info.state.messages:
            try:
                msgs = await psub.fetch(1000, timeout=5)
            except nats.errors.TimeoutError:
                break
            for msg in msgs:
                seen += 1
                key = (msg.headers or {}).get(MSG_ID_HEADER, "")
                counts[key] = counts.get(key, 0) + 1
            if msgs and msgs[-1].metadata.sequence.stream >= last:
                break
        await psub.unsubscribe()
        return counts
    finally:
        await nc.close()


def version_number(version: str) -> int:
    return int(version[1:]) if version[1:].isdigit() else 0


async def run(
    work: Path, rate: float, recommend_rate: float, after_s: float, scenario: str
) -> dict[str, Any]:
    """One scenario on fresh hosts: ``kill`` (host a's processes SIGKILLed) or ``partition`` (host a
    cut off the bridge, its processes running on alone, then healed)."""
    figures: dict[str, Any] = {"scenario": scenario}
    with Hosts(["a", "b", "c"], work) as hosts:
        hosts.start_nats()
        placed = start_freshrec(hosts, work, env={"trainer": TRAINER})
        procs = {name: p.process for name, p in placed.items()}
        a_status = await trainer_status(hosts.address("a", "trainer"))
        b_status = await trainer_status(hosts.address("b", "trainer"))
        assert a_status and b_status
        figures["leader_before"] = a_status.leader.split(" ")[0]
        figures["standby_role_before"] = trainer_pb2.TrainerRole.Name(b_status.role)

        load, stop = Load(), asyncio.Event()
        workers = [
            asyncio.create_task(
                produce(hosts.address("c", "ingestion"), rate, stop, load, secrets.token_hex(4))
            ),
            asyncio.create_task(recommend(hosts.address("c", "inference"), recommend_rate, stop, load)),
        ]
        inference = hosts.address("c", "inference")
        print("load running; waiting for the first model ...", flush=True)
        figures["first_model_s"] = round(
            await until(lambda: _nonempty(model_of(inference)), 180, "a first model"), 1
        )
        before = await model_of(inference)
        await asyncio.sleep(5)

        if scenario == "kill":
            print(f"serving {before}; killing host a (NATS node and the leading trainer)", flush=True)
            killed_at = time.monotonic()
            hosts.kill_host("a")
        else:
            print(f"serving {before}; cutting host a (NATS node and the leading trainer) off", flush=True)
            killed_at = time.monotonic()
            hosts.partition("a")
        trainer_b = hosts.address("b", "trainer")

        async def b_leads() -> bool:
            status = await trainer_status(trainer_b)
            return bool(status and status.role == trainer_pb2.TRAINER_ROLE_LEADER)

        figures["standby_leads_after_s"] = round(await until(b_leads, 120, "the standby leading"), 1)
        b_first = version_number(before)

        async def new_model() -> bool:
            return version_number(await model_of(inference)) > b_first

        figures["new_model_served_after_s"] = round(
            figures["standby_leads_after_s"] + await until(new_model, 180, "a version from the new leader"), 1
        )
        remaining = after_s - (time.monotonic() - killed_at)
        if remaining > 0:
            await asyncio.sleep(remaining)
        fault_end = time.monotonic()
        if scenario == "partition":
            # Healed, the old leader must find the lease taken and stand by, having published nothing.
            hosts.heal("a")
            trainer_a = hosts.address("a", "trainer")

            async def a_stands_by() -> bool:
                status = await trainer_status(trainer_a)
                return bool(status and status.role == trainer_pb2.TRAINER_ROLE_STANDBY)

            figures["old_leader_stands_by_after_heal_s"] = round(
                await until(a_stands_by, 60, "a standing by"), 1
            )

        # A new inference replica on another host, empty disk: the live model from the Object Store.
        started = time.monotonic()
        procs["inference-b"] = hosts.start_service(
            "b", "inference", {"FRESHREC_FEATURE_ADDR": hosts.address("b", "feature")}, name="inference-b"
        )
        wait_healthy(hosts.address("b", "inference"), 120, procs["inference-b"])
        live = (await trainer_status(trainer_b)).live_version  # type: ignore[union-attr]
        inference_b = hosts.address("b", "inference")
        # The trainer keeps publishing: the replica may skip from an older version past ``live``.
        await until(
            lambda: _at_least(model_of(inference_b), live), 120, "the new replica serving the live model"
        )
        figures["new_host_serves_live_model_s"] = round(time.monotonic() - started, 1)

        stop.set()
        await asyncio.gather(*workers)
        in_fault = [t for t in load.recommend_ok if killed_at <= t <= fault_end]
        failed = [t for t in load.recommend_failed if killed_at <= t <= fault_end]
        figures["recommend_success_during_fault"] = round(
            len(in_fault) / max(1, len(in_fault) + len(failed)), 5
        )
        figures["recommend_calls_during_fault"] = len(in_fault) + len(failed)

        # Ingestion acknowledges an event once its outbox holds it; after a fault the outbox may
        # still be draining into the stream. Lost: acknowledged and not in the stream within a minute.
        drained_from = time.monotonic()
        while True:
            try:
                counts = await stream_ids(hosts.nats_urls(first="b"))
            except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError):
                # JetStream still electing leaders after the heal: every read counts afresh, read again.
                if time.monotonic() - drained_from > 60:
                    raise
                await asyncio.sleep(2)
                continue
            if all(i in counts for i in load.acked) or time.monotonic() - drained_from > 60:
                break
            await asyncio.sleep(2)
        figures["outbox_drained_after_load_s"] = round(time.monotonic() - drained_from, 1)
        figures["events_acknowledged"] = len(load.acked)
        figures["events_lost"] = sum(1 for i in load.acked if i not in counts)
        figures["events_duplicated"] = sum(1 for i in load.acked if counts.get(i, 0) > 1)
        in_stream = sum(counts.values())

        # Whoever leads at the end (after a heal the lease may change hands again: a cut-off node
        # rejoining can unsettle the lease bucket's stream for longer than the TTL) must have learned
        # the whole stream, once: it resumed from the checkpoint its predecessor left.
        trainers = {"trainer-b": trainer_b}
        if scenario == "partition":
            trainers["trainer-a"] = hosts.address("a", "trainer")
        leader: dict[str, Any] = {}

        async def learned_all() -> bool:
            for name, address in trainers.items():
                status = await trainer_status(address)
                if status and status.role == trainer_pb2.TRAINER_ROLE_LEADER:
                    leader.update(name=name, status=status)
                    return status.watermark.stream_sequence >= in_stream
            return False

        await until(learned_all, 180, "the leader at the end learning the whole stream")
        figures["leader_at_end"] = leader["name"]
        figures["stream_events"] = in_stream
        figures["new_leader_learned"] = leader["status"].events_learned
        figures["ingest_failed_calls"] = load.failed_calls
    return figures


async def _nonempty(value: Any) -> bool:
    return bool(await value)


async def _at_least(value: Any, expected: str) -> bool:
    return version_number(await value) >= version_number(expected)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/hosts.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="lighter load, shorter fault (a smoke run)")
    parser.add_argument("--events-per-s", type=float, default=None)
    parser.add_argument("--recommend-per-s", type=float, default=None)
    parser.add_argument("--after-s", type=float, default=None, help="seconds of load after the kill")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (logs)")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=["kill", "partition"],
        default=["kill", "partition"],
        help="what befalls host a",
    )
    args = parser.parse_args()
    rate = args.events_per_s or (100.0 if args.quick else 300.0)
    recommend_rate = args.recommend_per_s or (50.0 if args.quick else 200.0)
    after_s = args.after_s or (25.0 if args.quick else 60.0)
    results = []
    for scenario in args.scenarios:
        print(f"== scenario {scenario}", flush=True)
        if args.keep is not None:
            folder = args.keep.resolve() / scenario
            folder.mkdir(parents=True, exist_ok=True)
            figures = asyncio.run(run(folder, rate, recommend_rate, after_s, scenario))
        else:
            with tempfile.TemporaryDirectory(prefix="freshrec-hosts-") as tmp:
                figures = asyncio.run(run(Path(tmp), rate, recommend_rate, after_s, scenario))
        results.append(figures)
        print(json.dumps(figures), flush=True)  # each scenario's figures as soon as it has them
    labels = {"kill": "host a killed", "partition": "host a partitioned, healed"}
    rows = [
        (
            "events lost / duplicated (target 0 / 0)",
            lambda f: f"{f['events_lost']} / {f['events_duplicated']}",
        ),
        (
            "leader at the end learned / events in the stream",
            lambda f: f"{f['new_leader_learned']} / {f['stream_events']}",
        ),
        ("leader at the end", lambda f: f["leader_at_end"]),
        (
            "Recommend success during the fault (target >= 99.9 %)",
            lambda f: f"{100 * f['recommend_success_during_fault']:.2f} %",
        ),
        ("standby leads after", lambda f: f"{f['standby_leads_after_s']} s"),
        (
            "new model served after losing the trainer's host (target <= 30 s)",
            lambda f: f"{f['new_model_served_after_s']} s",
        ),
        (
            "every acknowledged event in the stream after the load stopped",
            lambda f: f"{f['outbox_drained_after_load_s']} s",
        ),
        (
            "inference on a new host serves the live model after",
            lambda f: f"{f['new_host_serves_live_model_s']} s",
        ),
        (
            "old leader stands by after the heal",
            lambda f: f"{f.get('old_leader_stands_by_after_heal_s', '-')} s",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nunder {rate:g} events/s and {recommend_rate:g} Recommend/s, {after_s:g} s of fault")
    print(f"  {'':<{width}}  " + "  ".join(f"{labels[f['scenario']]:<28}" for f in results))
    for name, value in rows:
        print(f"  {name:<{width}}  " + "  ".join(f"{value(f):<28}" for f in results))
    summary: dict[str, Any] = {"events_per_s": rate, "recommend_per_s": recommend_rate, "fault_s": after_s}
    for f in results:
        summary.update({f"{f['scenario']}_{k}": v for k, v in f.items() if k != "scenario"})
    summary["events_lost"] = sum(f["events_lost"] for f in results)
    summary["events_duplicated"] = sum(f["events_duplicated"] for f in results)
    summary["worst_recommend_success"] = min(f["recommend_success_during_fault"] for f in results)
    summary["worst_new_model_served_after_s"] = max(f["new_model_served_after_s"] for f in results)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
