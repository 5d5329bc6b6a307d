"""A Jepsen-style harness: stream uniquely identified events through the real stack while a fault
is injected, then drain and classify every id.

Every event goes to its own user, so the feature service's count for that user says exactly how
many times the event was applied (0: lost, 2: applied twice). Ingestion's SQL log and the JetStream
stream are read as observers. The trainer is checked in aggregate: it must have learned exactly the
events the stream holds, once each.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import sqlalchemy
from nats.js.api import ConsumerConfig, DeliverPolicy

from cli.stack import Stack
from freshrec.v1 import (
    event_pb2,
    feature_pb2,
    feature_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from shared.nats import EVENTS_STREAM, MSG_ID_HEADER
from tests.harness import wait_serving

logger = logging.getLogger(__name__)


#: What an observer may meet while the stack recovers.
OBSERVER_ERRORS = (
    grpc.aio.AioRpcError,
    sqlalchemy.exc.SQLAlchemyError,
    OSError,
    TimeoutError,
    nats.errors.Error,
)


@dataclass
class Ledger:
    """What the producers know: every id they sent, and those the service acknowledged."""

    attempted: set[str] = field(default_factory=set)
    acknowledged: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)
    ack_times: list[float] = field(default_factory=list)
    failed_calls: int = 0


@dataclass
class Verdict:
    scenario: str
    attempted: int
    acknowledged: int
    stored: int
    in_stream: int
    applied: int
    lost: int
    duplicated: int
    unexpected: int
    trainer_learned: int
    bad_artifacts: int  # versions in the store that fail verification, plus versions inference rejected
    recovery_s: float
    drain_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.unexpected == 0 and self.bad_artifacts == 0

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "notes"} | {"ok": self.ok}


class Producer:
    """Sends batches of new events over gRPC and retries a batch until it is acknowledged,
    exactly as a careful producer would (same ids, so retries can only be duplicates)."""

    def __init__(self, stack: Stack, scenario: str, ledger: Ledger, batch: int = 25) -> None:
        self.stack = stack
        self.scenario = scenario
        self.ledger = ledger
        self.batch = batch
        self.next = 0

    def _batch(self) -> list[event_pb2.Event]:
        events = []
        for _ in range(self.batch):
            n = self.next
            self.next += 1
            e = event_pb2.Event(
                event_id=f"{self.scenario}-e{n}",
                user_id=f"{self.scenario}-u{n}",
                item_id=f"item-{n % 97}",
                type=event_pb2.EVENT_TYPE_CLICK,
            )
            e.occurred_at.GetCurrentTime()
            events.append(e)
        return events

    async def run(self, stop: asyncio.Event, rate: float = 300.0) -> None:
        """Sends about ``rate`` events per second until ``stop`` (a fault test, not a load test)."""
        next_at = time.monotonic()
        while not stop.is_set():
            events = self._batch()
            self.ledger.attempted.update(e.event_id for e in events)
            await self._send_until_acked(events, stop)
            next_at = max(next_at + self.batch / rate, time.monotonic() - 1.0)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _send_until_acked(self, events: list[event_pb2.Event], stop: asyncio.Event) -> None:
        request = ingestion_pb2.IngestEventsRequest(events=events)
        while True:
            try:
                async with grpc.aio.insecure_channel(self.stack.address("ingestion")) as channel:
                    response = await ingestion_pb2_grpc.IngestionServiceStub(channel).IngestEvents(
                        request, timeout=10
                    )
            except grpc.aio.AioRpcError:
                self.ledger.failed_calls += 1
                if stop.is_set():
                    return  # never acknowledged: attempted only
                await asyncio.sleep(0.2)
                continue
            rejected = {e.event_id for e in response.errors}
            self.ledger.rejected |= rejected
            self.ledger.acknowledged.update(e.event_id for e in events if e.event_id not in rejected)
            self.ledger.ack_times.append(time.monotonic())
            return


async def stream_counts(nats_url: str) -> Counter[str]:
    """How many times each Nats-Msg-Id appears in FRESHREC_EVENTS (read with an ordered consumer)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    info = await js.stream_info(EVENTS_STREAM)
    counts: Counter[str] = Counter()
    if info.state.messages:
        sub = await js.subscribe(
            ">",
            stream=EVENTS_STREAM,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=10)
            counts[(msg.headers or {}).get(MSG_ID_HEADER, "")] += 1
        await sub.unsubscribe()
    await nc.close()
    return counts


def stored_ids(stack: Stack) -> Counter[str]:
    """Event ids in ingestion's SQL event log (an observer reading its database, SQLite or PostgreSQL)."""
    engine = sqlalchemy.create_engine(stack.services["ingestion"].env["FRESHREC_DATABASE__URL"])
    try:
        with engine.connect() as connection:
            return Counter(connection.execute(sqlalchemy.text("SELECT event_id FROM events")).scalars())
    finally:
        engine.dispose()


async def applied_counts(stack: Stack, users: list[str]) -> dict[str, int]:
    async with grpc.aio.insecure_channel(stack.address("feature")) as channel:
        stub = feature_pb2_grpc.FeatureServiceStub(channel)
        semaphore = asyncio.Semaphore(32)

        async def one(user: str) -> tuple[str, int]:
            async with semaphore:
                r = await stub.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id=user), timeout=10)
            return user, sum(r.features.event_counts.values())

        return dict(await asyncio.gather(*(one(u) for u in users)))


async def trainer_status(stack: Stack) -> trainer_pb2.GetTrainerStatusResponse:
    async with grpc.aio.insecure_channel(stack.address("trainer")) as channel:
        return await trainer_pb2_grpc.TrainerServiceStub(channel).GetTrainerStatus(
            trainer_pb2.GetTrainerStatusRequest(), timeout=10
        )


async def feature_position(stack: Stack) -> int:
    async with grpc.aio.insecure_channel(stack.address("feature")) as channel:
        r = await feature_pb2_grpc.FeatureServiceStub(channel).GetUserFeatures(
            feature_pb2.GetUserFeaturesRequest(user_id="-"), timeout=10
        )
    return int(r.watermark.stream_sequence)


async def drain(stack: Stack, timeout_s: float = 180.0) -> float:
    """Waits until ingestion's outbox is published and feature and trainer reached the stream's end."""
    start = time.monotonic()
    last: tuple[Any, ...] = ()
    while time.monotonic() - start < timeout_s:
        try:
            stored = sum(stored_ids(stack).values())
            counts = await stream_counts(stack.nats.url)
            in_stream = sum(counts.values())
            applied_to = await feature_position(stack)
            learned = (await trainer_status(stack)).watermark.stream_sequence
            last = (stored, in_stream, applied_to, learned)
            if stored == len(counts) and in_stream and applied_to >= in_stream and learned >= in_stream:
                return time.monotonic() - start
        except (
            grpc.aio.AioRpcError,
            sqlalchemy.exc.SQLAlchemyError,
            OSError,
            TimeoutError,
            nats.errors.Error,
        ):
            pass
        await asyncio.sleep(0.5)
    raise AssertionError(
        f"the stack did not drain within {timeout_s}s (stored, stream, feature, trainer) = {last}"
    )


async def run_scenario(
    stack: FaultStack,
    scenario: str,
    inject: Callable[[Stack], Awaitable[None]],
    producers: int = 2,
    rate: float = 300.0,
    warmup_s: float = 2.0,
    cooldown_s: float = 2.0,
) -> Verdict:
    """Streams events, injects the fault while they flow, drains, and classifies every id."""
    ledger = Ledger()
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(Producer(stack, f"{scenario}{p}", ledger).run(stop, rate))
        for p in range(producers)
    ]
    await asyncio.sleep(warmup_s)
    await inject(stack)
    fault_over = time.monotonic()
    await asyncio.sleep(cooldown_s)
    stop.set()
    await asyncio.gather(*workers)
    after = [t for t in ledger.ack_times if t >= fault_over]
    recovery_s = (after[0] - fault_over) if after else float("nan")

    drain_s = await drain(stack)
    stored = stored_ids(stack)
    in_stream = await stream_counts(stack.nats.url)
    users = sorted(e.replace("-e", "-u", 1) for e in ledger.attempted)
    applied_by_user = await applied_counts(stack, users)
    applied = {u.replace("-u", "-e", 1): n for u, n in applied_by_user.items() if n}
    status = await trainer_status(stack)
    bad_artifacts, artifact_notes = check_artifacts(stack)

    lost = {e for e in ledger.acknowledged if stored[e] == 0 or applied.get(e, 0) == 0}
    duplicated = (
        {e for e, n in stored.items() if n > 1}
        | {e for e, n in in_stream.items() if n > 1}
        | {e for e, n in applied.items() if n > 1}
    )
    unexpected = (set(stored) | set(in_stream) | set(applied)) - ledger.attempted
    verdict = Verdict(
        scenario=scenario,
        attempted=len(ledger.attempted),
        acknowledged=len(ledger.acknowledged),
        stored=len(stored),
        in_stream=sum(in_stream.values()),
        applied=sum(applied.values()),
        lost=len(lost),
        duplicated=len(duplicated),
        unexpected=len(unexpected),
        trainer_learned=int(status.events_learned),
        bad_artifacts=bad_artifacts,
        recovery_s=round(recovery_s, 2),
        drain_s=round(drain_s, 2),
    )
    if status.events_learned != sum(in_stream.values()):
        verdict.duplicated += max(0, int(status.events_learned) - sum(in_stream.values()))
        verdict.notes.append(
            f"trainer learned {status.events_learned} of {sum(in_stream.values())} stream events"
        )
    verdict.notes += artifact_notes
    if lost:
        verdict.notes.append(f"lost e.g. {sorted(lost)[:5]}")
    if duplicated:
        verdict.notes.append(f"duplicated e.g. {sorted(duplicated)[:5]}")
    if unexpected:
        verdict.notes.append(f"unexpected e.g. {sorted(unexpected)[:5]}")
    return verdict


def check_artifacts(stack: FaultStack) -> tuple[int, list[str]]:
    """Every stored version verifies, and inference rejected none (it never saw a partial one)."""
    from shared.model_store import ArtifactError, ModelStore

    store = ModelStore(stack.data_dir / "models")
    bad, notes = 0, []
    for version in store.list_versions():
        try:
            store.open_verified(version)
        except ArtifactError as exc:
            bad += 1
            notes.append(str(exc))
    port = stack.services["inference"].metrics_port
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
    for line in metrics.read().decode().splitlines():
        if line.startswith('freshrec_inference_reloads_total{outcome="rejected"}'):
            rejected = int(float(line.split()[-1]))
            if rejected:
                bad += rejected
                notes.append(f"inference rejected {rejected} model loads")
    return bad, notes


class FaultStack(Stack):
    """The embedded stack on free ports, with quick exports (the trainer checkpoints often) and
    quick reconnections."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(
            tmp_path / "var",
            ports={"nats": 0, "ingestion": 0, "feature": 0, "trainer": 0, "inference": 0},
            extra_env={
                "trainer": {"FRESHREC_EXPORT_INTERVAL_S": "2", "FRESHREC_NATS__RECONNECT_WAIT_S": "0.2"},
                "ingestion": {"FRESHREC_NATS__RECONNECT_WAIT_S": "0.2", "FRESHREC_RELAY_INTERVAL_S": "0.5"},
                "feature": {"FRESHREC_NATS__RECONNECT_WAIT_S": "0.2"},
                "inference": {"FRESHREC_NATS__RECONNECT_WAIT_S": "0.2", "FRESHREC_POLL_INTERVAL_S": "1"},
            },
            log_dir=tmp_path / "logs",
        )


def kill(stack: Stack, name: str, sig: int = 9) -> None:
    """Sends a signal (SIGKILL by default) to one service and waits for it to die."""
    process = stack.services[name].process
    assert process is not None
    process.send_signal(sig)
    process.wait(30)


async def restart(stack: Stack, name: str, timeout_s: float = 60.0) -> None:
    """Starts a (dead) service again on its port and waits until it is SERVING."""
    service = stack.services[name]
    log = stack.log_dir / f"{name}.log" if stack.log_dir else None
    service.start(log)
    await asyncio.to_thread(wait_serving, service.address, timeout_s, service.process)
