"""Serving benchmark: Recommend latency and throughput, reloads under load, memory, ANN recall.

Everything runs on this machine: nats-server, the real feature service and the real inference
service as subprocesses (``python -m services.<name>``), a trivial gRPC echo server as a
subprocess for comparison, and the load generator in this process. The model is trained and
exported with the trainer's own code on synthetic taste data over a catalogue of 10,000 items;
the feature service is fed the users' events through JetStream and the catalogue through
``UpsertItems`` (and ``FRESHREC_CATALOG``).

Phases (figures in the last line's JSON):

1. open loop, 300 requests/s of ``Recommend`` k=10 (latency from the scheduled send time);
   then the same on a second replica that publishes no served lists, in alternating windows:
   what publishing ``freshrec.recommendations.served`` adds to a request;
2. closed loop, 16 concurrent clients, then the echo server the same way, and the ratio;
3. freshness: a click on a user's top item, published to JetStream, until the next answer
   drops it (excluded as seen);
4. 200 requests/s steady, then 200 requests/s with 20 model reloads spread over 60 s;
5. RSS of the inference process before and after 100 more reloads;
6. ANN (faiss HNSW) recall@10 against the exact product, on the trained model's user vectors.

    .venv/bin/python bench/serve.py            # the full run (a few minutes)
    .venv/bin/python bench/serve.py --quick    # a short smoke run on a smaller catalogue
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

ECHO_METHOD = "/bench.Echo/Echo"


@dataclass(frozen=True)
class Config:
    items: int
    categories: int
    users: int
    events_per_user: int
    feature_events_per_user: int
    open_rate: float
    open_s: float
    clients: int
    closed_s: float
    reload_rate: float
    steady_s: float
    reload_s: float
    reloads: int
    rss_reloads: int
    freshness_probes: int
    ann_queries: int


FULL = Config(
    items=10_000,
    categories=50,
    users=2_000,
    events_per_user=25,
    feature_events_per_user=20,
    open_rate=300,
    open_s=20,
    clients=16,
    closed_s=15,
    reload_rate=200,
    steady_s=20,
    reload_s=60,
    reloads=20,
    rss_reloads=100,
    freshness_probes=40,
    ann_queries=1000,
)
QUICK = Config(
    items=2_000,
    categories=20,
    users=300,
    events_per_user=8,
    feature_events_per_user=8,
    open_rate=300,
    open_s=2,
    clients=16,
    closed_s=2,
    reload_rate=200,
    steady_s=2,
    reload_s=4,
    reloads=2,
    rss_reloads=4,
    freshness_probes=3,
    ann_queries=200,
)


# -- the echo server (run as a subprocess of this script) ------------------------------------------
async def echo_server(port: int) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


# -- synthetic data and the model -----------------------------------------------------------------
def synthetic(cfg: Config, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, list[str]]]]:
    """(user, item) events in time order, and the catalogue (item id, categories)."""
    rng = np.random.default_rng(seed)
    per_category = cfg.items // cfg.categories
    catalogue = [(f"i{n}", [f"c{n // per_category}"]) for n in range(cfg.items)]
    events = [(f"u{int(rng.integers(cfg.users))}", f"i{n}") for n in rng.permutation(cfg.items)]
    tastes = rng.integers(0, cfg.categories, size=(cfg.users, 2))
    for _ in range(cfg.events_per_user):
        picks = tastes[np.arange(cfg.users), rng.integers(0, 2, cfg.users)]
        ranks = np.minimum(rng.zipf(1.3, cfg.users) - 1, per_category - 1)
        for u in range(cfg.users):
            events.append((f"u{u}", f"i{int(picks[u]) * per_category + int(ranks[u])}"))
    return events, catalogue


def train_and_export(events: list[tuple[str, str]]) -> tuple[dict[str, bytes], dict[str, Any], float]:
    """The trainer's learner and exporter (the bench is not the inference image: torch is fine)."""
    import torch

    from services.trainer.export import export_learner
    from services.trainer.learner import OnlineLearner
    from tests.factories import event

    torch.set_num_threads(1)
    learner = OnlineLearner(dim=64, max_history=50, learning_rate=0.01)
    started = time.perf_counter()
    batch = []
    for seq, (user, item) in enumerate(events, start=1):
        batch.append((seq, event(user, item, at=1_700_000_000 + seq)))
        if len(batch) == 512:
            learner.learn(batch)
            batch = []
    if batch:
        learner.learn(batch)
    # This bench measures the model's serving path: no popularity column qualifies for the policy.
    learner.policy.min_events = 10**12
    exported = export_learner(learner, parent_version=None)
    return exported.files, exported.manifest, time.perf_counter() - started


# -- helpers --------------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@dataclass
class Run:
    latencies: list[float]
    sent_at: list[float]
    errors: list[str]
    seconds: float

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.latencies) + len(self.errors),
            "errors": len(self.errors),
            "rps": round(self.rps, 1),
            "p50_ms": ms(pct(self.latencies, 50)),
            "p90_ms": ms(pct(self.latencies, 90)),
            "p99_ms": ms(pct(self.latencies, 99)),
            "max_ms": ms(max(self.latencies, default=float("nan"))),
        }

    def p99_per_second(self, origin: float) -> list[list[float]]:
        buckets: dict[int, list[float]] = {}
        for sent, latency in zip(self.sent_at, self.latencies, strict=True):
            buckets.setdefault(int(sent - origin), []).append(latency)
        return [[float(s), ms(pct(v, 99))] for s, v in sorted(buckets.items())]


async def open_loop(call: Any, make: Any, rate: float, seconds: float) -> Run:
    """Requests at a fixed rate regardless of answers; latency counts from the scheduled time."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    sent: list[float] = []
    errors: list[str] = []

    async def one(scheduled: float, request: Any) -> None:
        try:
            await call(request, timeout=10)
            latencies.append(loop.time() - scheduled)
            sent.append(scheduled)
        except grpc.aio.AioRpcError as exc:
            errors.append(f"{exc.code().name}: {exc.details()}")

    start = loop.time() + 0.05
    tasks = []
    for n in range(int(rate * seconds)):
        scheduled = start + n / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled, make(n))))
    await asyncio.gather(*tasks)
    return Run(latencies, sent, errors, loop.time() - start)


async def closed_loop(call: Any, make: Any, clients: int, seconds: float) -> Run:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    sent: list[float] = []
    errors: list[str] = []
    deadline = loop.time() + seconds

    async def client(c: int) -> None:
        n = c
        while loop.time() < deadline:
            began = loop.time()
            try:
                await call(make(n), timeout=10)
                latencies.append(loop.time() - began)
                sent.append(began)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
            n += clients

    start = loop.time()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return Run(latencies, sent, errors, loop.time() - start)


# -- the benchmark --------------------------------------------------------------------------------
async def served_list_cost(
    stub: Any, inference: Any, workdir: Path, js: Any, recommend: Any, cfg: Config, served_stream: str
) -> dict[str, Any]:
    """What publishing the served lists costs a request: the same open loop on this replica and on
    a second one with publishing turned off, in alternating windows (A B B A A B) so that drift on
    the shared machine falls on both alike."""
    from cli.stack import ServiceProcess, free_port, wait_healthy
    from freshrec.v1 import inference_pb2, inference_pb2_grpc

    quiet = ServiceProcess(
        "inference",
        free_port(),
        {**inference.env, "FRESHREC_SERVED__ENABLED": "false"},
        instance="inference-unpublished",
    )
    quiet.env["FRESHREC_GRPC__PORT"] = str(quiet.port)
    quiet.start(workdir / "inference-unpublished.log")
    try:
        wait_healthy(quiet.address, 120, quiet.process)
        async with grpc.aio.insecure_channel(quiet.address) as channel:
            quiet_stub = inference_pb2_grpc.InferenceServiceStub(channel)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                info = await quiet_stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
                if info.model_version == "v000001" and info.catalogue_size >= cfg.items:
                    break
                await asyncio.sleep(0.2)
            await closed_loop(quiet_stub.Recommend, recommend, cfg.clients, 1.0)  # warm-up
            before = (await js.stream_info(served_stream)).state.messages
            window = max(1.0, cfg.open_s / 2)
            published: list[float] = []
            unpublished: list[float] = []
            errors = 0
            for publishing in (True, False, False, True, True, False):
                run = await open_loop(
                    (stub if publishing else quiet_stub).Recommend, recommend, cfg.open_rate, window
                )
                (published if publishing else unpublished).extend(run.latencies)
                errors += len(run.errors)
    finally:
        quiet.stop()
    stored = (await js.stream_info(served_stream)).state.messages - before
    return {
        "rate": cfg.open_rate,
        "seconds_each": 3 * window,
        "published_p50_ms": ms(pct(published, 50)),
        "unpublished_p50_ms": ms(pct(unpublished, 50)),
        "p50_overhead_ms": round(ms(pct(published, 50)) - ms(pct(unpublished, 50)), 3),
        "published_p99_ms": ms(pct(published, 99)),
        "unpublished_p99_ms": ms(pct(unpublished, 99)),
        "lists_stored": stored,
        "requests_publishing": len(published),
        "errors": errors,
    }


async def bench(cfg: Config, quick: bool, workdir: Path) -> dict[str, Any]:
    import nats

    from cli.stack import NatsServer, ServiceProcess, free_port, wait_healthy
    from freshrec.v1 import (
        event_pb2,
        feature_pb2,
        feature_pb2_grpc,
        inference_pb2,
        inference_pb2_grpc,
        item_pb2,
        trainer_pb2,
    )
    from shared.model_store import ModelStore
    from shared.nats import (
        CATALOGUE_ACCEPTED_SUBJECT,
        CATALOGUE_STREAM,
        MODELS_PUBLISHED_SUBJECT,
        MSG_ID_HEADER,
        SERVED_STREAM,
        accepted_subject,
        ensure_catalogue_stream,
        ensure_events_stream,
    )
    from tests.factories import event

    figures: dict[str, Any] = {"bench": "serve", "quick": quick, "catalogue_items": cfg.items}
    print(f"== serve bench ({'quick' if quick else 'full'}): catalogue {cfg.items} items, {cfg.users} users")
    events, catalogue = synthetic(cfg)
    files, manifest, train_s = train_and_export(events)
    print(f"trained and exported with the trainer's code on {len(events)} events in {train_s:.1f}s")
    store = ModelStore(workdir / "models")
    first = store.write_version("v000001", files, manifest)
    store.set_live("v000001")

    nats_server = NatsServer(workdir / "nats")
    nats_server.start()
    processes: list[ServiceProcess] = []
    echo: subprocess.Popen[bytes] | None = None
    nc = await nats.connect(nats_server.url)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
        env.update(
            {
                "FRESHREC_NATS__URL": nats_server.url,
                "FRESHREC_GRPC__HOST": "127.0.0.1",
                "FRESHREC_METRICS__ENABLED": "false",
                "FRESHREC_LOG__LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
            }
        )
        feature = ServiceProcess(
            "feature",
            free_port(),
            {
                **env,
                "FRESHREC_DATABASE__URL": f"sqlite:///{workdir / 'feature.db'}",
                "FRESHREC_DATABASE__SQLITE_SYNCHRONOUS": "NORMAL",
            },
        )
        feature.env["FRESHREC_GRPC__PORT"] = str(feature.port)
        feature.start(workdir / "feature.log")
        processes.append(feature)
        wait_healthy(feature.address, 120, feature.process)

        # Users' recent events into the feature service, through JetStream as ingestion would.
        js = nc.jetstream()
        await ensure_events_stream(js)
        recent: dict[str, list[str]] = {}
        for user, item in events:
            recent.setdefault(user, []).append(item)
        feed = [(u, i) for u, items in recent.items() for i in items[-cfg.feature_events_per_user :]]
        at = time.time() - 3600
        for n, (user, item) in enumerate(feed):
            e = event(user, item, event_id=f"b{n}", at=at + n * 1e-3)
            await js.publish_async(
                accepted_subject("EVENT_TYPE_CLICK", user),
                e.SerializeToString(),
                headers={MSG_ID_HEADER: e.event_id},
            )
        await js.publish_async_completed()
        feature_channel = grpc.aio.insecure_channel(feature.address)
        features = feature_pb2_grpc.FeatureServiceStub(feature_channel)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            r = await features.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id="u0"))
            if r.watermark.stream_sequence >= len(feed):
                break
            await asyncio.sleep(0.2)
        # The catalogue: UpsertItems (the feature service's own catalogue and per-category popularity),
        # and FRESHREC_CATALOG for inference, unless the feature service already published it there.
        items = [item_pb2.Item(item_id=i, title=f"Item {i}", categories=c) for i, c in catalogue]
        for start in range(0, len(items), 1000):
            await features.UpsertItems(feature_pb2.UpsertItemsRequest(items=items[start : start + 1000]))
        await ensure_catalogue_stream(js)
        published = (await js.stream_info(CATALOGUE_STREAM)).state.messages
        if published < len(items):
            for item in items:
                await js.publish_async(CATALOGUE_ACCEPTED_SUBJECT, item.SerializeToString())
            await js.publish_async_completed()
        print(f"feature service fed {len(feed)} events and {len(items)} catalogue items")

        inference = ServiceProcess(
            "inference",
            free_port(),
            {
                **env,
                "FRESHREC_MODEL_STORE": str(store.root),
                "FRESHREC_FEATURE_ADDR": feature.address,
                "FRESHREC_POLL_INTERVAL_S": "30",
            },
        )
        inference.env["FRESHREC_GRPC__PORT"] = str(inference.port)
        inference.start(workdir / "inference.log")
        processes.append(inference)
        wait_healthy(inference.address, 120, inference.process)
        assert inference.process is not None
        pid = inference.process.pid
        channel = grpc.aio.insecure_channel(inference.address)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
            if info.model_version == "v000001" and info.catalogue_size >= cfg.items:
                break
            await asyncio.sleep(0.2)
        figures["catalogue_served"] = info.catalogue_size

        echo_port = free_port()
        echo = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--echo-server", str(echo_port)],
            start_new_session=True,
        )
        echo_channel = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}")
        await asyncio.wait_for(echo_channel.channel_ready(), 30)
        echo_call = echo_channel.unary_unary(ECHO_METHOD)

        rng = np.random.default_rng(1)
        users = [f"u{u}" for u in rng.integers(0, cfg.users, 200_000)]

        def recommend(n: int) -> Any:
            return inference_pb2.RecommendRequest(user_id=users[n % len(users)], k=10)

        echo_payload = recommend(0).SerializeToString()
        # This process trained the model and holds its data: a full garbage collection here would
        # stall the load generator itself (~180 ms was seen) and count as Recommend latency.
        gc.collect()
        gc.freeze()
        warm = await closed_loop(stub.Recommend, recommend, cfg.clients, 2.0)
        probe = await stub.Recommend(recommend(0))
        assert len(probe.items) == 10 and probe.items[0].source == inference_pb2.RECOMMENDATION_SOURCE_MODEL
        print(f"warm-up: {warm.rps:.0f} req/s")

        run = await open_loop(stub.Recommend, recommend, cfg.open_rate, cfg.open_s)
        figures["open_loop"] = {"rate": cfg.open_rate, "seconds": cfg.open_s, **run.summary()}
        figures["served_lists"] = await served_list_cost(
            stub, inference, workdir, js, recommend, cfg, served_stream=SERVED_STREAM
        )

        assert feature.process is not None
        cpu_before = cpu_seconds(pid), cpu_seconds(feature.process.pid), time.process_time()
        run = await closed_loop(stub.Recommend, recommend, cfg.clients, cfg.closed_s)
        cpu_after = cpu_seconds(pid), cpu_seconds(feature.process.pid), time.process_time()
        cpu_used, feature_cpu, client_cpu = (a - b for a, b in zip(cpu_after, cpu_before, strict=True))
        figures["closed_loop"] = {
            "clients": cfg.clients,
            "seconds": cfg.closed_s,
            **run.summary(),
            "inference_cpu_ms_per_request": round(1000 * cpu_used / max(len(run.latencies), 1), 3),
            "feature_cpu_ms_per_request": round(1000 * feature_cpu / max(len(run.latencies), 1), 3),
            "load_generator_cpu_ms_per_request": round(1000 * client_cpu / max(len(run.latencies), 1), 3),
        }
        echo_cpu_before = cpu_seconds(echo.pid)
        echo_run = await closed_loop(echo_call, lambda n: echo_payload, cfg.clients, cfg.closed_s)
        echo_cpu = cpu_seconds(echo.pid) - echo_cpu_before
        figures["echo_closed_loop"] = {
            "clients": cfg.clients,
            "seconds": cfg.closed_s,
            **echo_run.summary(),
            "server_cpu_ms_per_request": round(1000 * echo_cpu / max(len(echo_run.latencies), 1), 3),
        }
        figures["recommend_to_echo_ratio"] = round(run.rps / echo_run.rps, 3) if echo_run.rps else None

        # Freshness: click the user's top item; the next answer must drop it (seen items are excluded).
        delays = []
        for n in range(cfg.freshness_probes):
            user = f"u{n}"
            top = (await stub.Recommend(inference_pb2.RecommendRequest(user_id=user, k=10))).items[0].item_id
            e = event(user, top, event_id=f"fresh{n}", type=event_pb2.EVENT_TYPE_CLICK)
            await js.publish(
                accepted_subject("EVENT_TYPE_CLICK", user),
                e.SerializeToString(),
                headers={MSG_ID_HEADER: e.event_id},
            )
            sent = time.monotonic()
            while time.monotonic() - sent < 10:
                r = await stub.Recommend(inference_pb2.RecommendRequest(user_id=user, k=10))
                if top not in {i.item_id for i in r.items}:
                    delays.append(time.monotonic() - sent)
                    break
        figures["freshness"] = {
            "probes": cfg.freshness_probes,
            "changed": len(delays),
            "p50_ms": ms(pct(delays, 50)),
            "p99_ms": ms(pct(delays, 99)),
            "max_ms": ms(max(delays, default=float("nan"))),
        }

        steady = await open_loop(stub.Recommend, recommend, cfg.reload_rate, cfg.steady_s)
        figures["steady"] = {"rate": cfg.reload_rate, "seconds": cfg.steady_s, **steady.summary()}

        # Reloads during load: pre-written versions, made live and announced as the trainer does.
        next_version = 2
        pending = []
        for _ in range(cfg.reloads):
            version = f"v{next_version:06d}"
            stored = store.write_version(version, files, {**manifest, "parent_version": "v000001"})
            pending.append((version, stored.manifest["sha256"]))
            next_version += 1

        async def announce(version: str, sha256: str) -> None:
            await asyncio.to_thread(store.set_live, version)
            msg = trainer_pb2.ModelAnnouncement(version=version, sha256=sha256, reason="published")
            await nc.publish(MODELS_PUBLISHED_SUBJECT, msg.SerializeToString())
            await nc.flush()

        async def reloader(origin: float) -> list[float]:
            at = []
            for n, (version, sha) in enumerate(pending):
                wait = origin + (n + 0.5) * cfg.reload_s / cfg.reloads - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                at.append(time.monotonic() - origin)
                await announce(version, sha)
            return at

        origin = time.monotonic()
        loop_origin = asyncio.get_running_loop().time()
        reload_task = asyncio.create_task(reloader(origin))
        during = await open_loop(stub.Recommend, recommend, cfg.reload_rate, cfg.reload_s)
        reload_at = await reload_task
        info = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
        figures["reloads"] = {
            "rate": cfg.reload_rate,
            "seconds": cfg.reload_s,
            "reloads": cfg.reloads,
            "serving_at_end": info.model_version,
            "all_swapped": info.model_version == pending[-1][0],
            **during.summary(),
            "p99_vs_steady": round(pct(during.latencies, 99) / pct(steady.latencies, 99), 3),
        }

        # Memory: 100 more reloads, one after another, each waited for.
        rss_before = rss_mb(pid)
        first_rss_version = next_version
        for _ in range(cfg.rss_reloads):
            version = f"v{next_version:06d}"
            stored = store.write_version(version, files, {**manifest, "parent_version": "v000001"})
            await announce(version, stored.manifest["sha256"])
            while (await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())).model_version != version:
                await asyncio.sleep(0.01)
            if next_version - 5 >= first_rss_version:  # bounded disk use; the model keeps v000001
                store.remove_version(f"v{next_version - 5:06d}")
            next_version += 1
        await stub.Recommend(recommend(0))
        rss_after = rss_mb(pid)
        figures["rss"] = {
            "reloads": cfg.rss_reloads,
            "before_mb": round(rss_before, 1),
            "after_mb": round(rss_after, 1),
            "growth_mb": round(rss_after - rss_before, 1),
        }
        figures["series"] = {
            "steady_p99_ms_per_s": steady.p99_per_second(steady.sent_at[0] if steady.sent_at else 0.0),
            "reload_p99_ms_per_s": during.p99_per_second(loop_origin),
            "reload_at_s": [[round(t, 2), 1.0] for t in reload_at],
        }
        for c in (channel, echo_channel, feature_channel):
            await c.close()
    finally:
        await nc.close()
        if echo is not None:
            echo.send_signal(signal.SIGTERM)
            try:
                echo.wait(10)
            except subprocess.TimeoutExpired:
                echo.kill()
        for process in reversed(processes):
            process.stop()
        nats_server.stop()

    figures["ann"] = ann_recall(store, first.version, events, cfg)
    return figures


def ann_recall(store: Any, version: str, events: list[tuple[str, str]], cfg: Config) -> dict[str, Any]:
    """recall@10 of the HNSW index against the exact product, for real user vectors."""
    from services.inference.ann import AnnIndex, AnnSettings
    from services.inference.index import top_k
    from services.inference.model import load_model

    model = load_model(store, version, None, 1)
    histories: dict[str, list[tuple[str, int]]] = {}
    for user, item in events:
        histories.setdefault(user, []).append((item, 2))
    users = list(histories)[: cfg.ann_queries]
    vectors = model.user_vectors([histories[u][-50:] for u in users], users)
    settings = AnnSettings(exact_limit=0)
    started = time.perf_counter()
    index = AnnIndex.build(model.item_matrix, settings)
    build_s = time.perf_counter() - started
    recalls, exact_t, ann_t = [], [], []
    for vector in vectors:
        t0 = time.perf_counter()
        scores = model.item_matrix @ vector
        scores[0] = -np.inf
        exact = top_k(scores, 10)
        t1 = time.perf_counter()
        rows, _ = index.search(vector, 10)
        t2 = time.perf_counter()
        exact_t.append(t1 - t0)
        ann_t.append(t2 - t1)
        recalls.append(len(set(exact.tolist()) & set(rows.tolist())) / 10)
    return {
        "items": len(model.item_ids) - 1,
        "queries": len(users),
        "m": settings.m,
        "ef_search": settings.ef_search,
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "build_s": round(build_s, 3),
        "exact_p50_ms": ms(pct(exact_t, 50)),
        "ann_p50_ms": ms(pct(ann_t, 50)),
    }


TARGETS = [
    ("open loop 300/s p50", lambda f: f["open_loop"]["p50_ms"], "≤ 5 ms", lambda v: v <= 5),
    ("open loop 300/s p99", lambda f: f["open_loop"]["p99_ms"], "≤ 20 ms", lambda v: v <= 20),
    ("open loop errors", lambda f: f["open_loop"]["errors"], "0", lambda v: v == 0),
    (
        "served-list publishing, p50 added",
        lambda f: f["served_lists"]["p50_overhead_ms"],
        "≤ 0.2 ms",
        lambda v: v <= 0.2,
    ),
    ("closed loop 16 clients req/s", lambda f: f["closed_loop"]["rps"], "≥ 1000", lambda v: v >= 1000),
    ("echo server req/s (same clients)", lambda f: f["echo_closed_loop"]["rps"], "reference", None),
    ("Recommend / echo throughput", lambda f: f["recommend_to_echo_ratio"], "ratio", None),
    ("inference CPU per request (ms)", lambda f: f["closed_loop"]["inference_cpu_ms_per_request"], "", None),
    ("feature CPU per request (ms)", lambda f: f["closed_loop"]["feature_cpu_ms_per_request"], "", None),
    (
        "load generator CPU per request (ms)",
        lambda f: f["closed_loop"]["load_generator_cpu_ms_per_request"],
        "",
        None,
    ),
    (
        "echo server CPU per request (ms)",
        lambda f: f["echo_closed_loop"]["server_cpu_ms_per_request"],
        "",
        None,
    ),
    ("event -> changed answer p50 (ms)", lambda f: f["freshness"]["p50_ms"], "", None),
    ("event -> changed answer max (ms)", lambda f: f["freshness"]["max_ms"], "≤ 1000", lambda v: v <= 1000),
    ("steady 200/s p99 (ms)", lambda f: f["steady"]["p99_ms"], "", None),
    ("reloads: failed requests", lambda f: f["reloads"]["errors"], "0", lambda v: v == 0),
    ("reloads: p99 (ms)", lambda f: f["reloads"]["p99_ms"], "", None),
    ("reloads: p99 / steady p99", lambda f: f["reloads"]["p99_vs_steady"], "≤ 2", lambda v: v <= 2),
    ("RSS growth after reloads (MB)", lambda f: f["rss"]["growth_mb"], "≤ 50", lambda v: v <= 50),
    ("ANN recall@10 vs exact", lambda f: f["ann"]["recall_at_10"], "≥ 0.95", lambda v: v >= 0.95),
]


def report(figures: dict[str, Any]) -> None:
    print()
    print(f"{'figure':<36} {'value':>12}  {'target':<10} ok")
    print("-" * 64)
    met = {}
    for name, get, target, check in TARGETS:
        value = get(figures)
        ok = "" if check is None else ("yes" if check(value) else "NO")
        if check is not None:
            met[name] = bool(check(value))
        print(f"{name:<36} {value!s:>12}  {target:<10} {ok}")
    figures["targets_met"] = met
    figures["headline"] = [
        "open_loop.p50_ms",
        "open_loop.p99_ms",
        "served_lists.p50_overhead_ms",
        "closed_loop.rps",
        "echo_closed_loop.rps",
        "reloads.errors",
        "reloads.p99_vs_steady",
        "rss.growth_mb",
        "ann.recall_at_10",
    ]
    figures["note"] = "load generator, nats-server, feature and inference share this machine's 2 cores" + (
        "; other engineers' work may be running too" if os.environ.get("CI") != "true" else ""
    )
    print()
    print(json.dumps(figures, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run on a smaller catalogue")
    parser.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        asyncio.run(echo_server(args.echo_server))
        return

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through bench()'s cleanup: no service outlives the bench

    signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory(prefix="freshrec-bench-serve-") as tmp:
        figures = asyncio.run(bench(QUICK if args.quick else FULL, args.quick, Path(tmp)))
    report(figures)


if __name__ == "__main__":
    main()
