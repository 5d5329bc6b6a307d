"""``freshrec demo``: stream a synthetic world whose tastes drift, and watch freshrec follow them.

Every second the demo shows the events/s it sends, the model version each inference replica
serves, the trainer's prequential HR@10 (the recent window when the trainer reports one, else
the running figure) and its own check of what is served: the share of a user's top-10 that is in
the category the user's group prefers *now* (random would be 1 / categories). After each drift
both dip, then rise as the model learns the new tastes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from cli.clients import CliError, Endpoints, call
from cli.synthetic import SyntheticEvent, SyntheticWorld
from freshrec.v1 import (
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

#: Trainer metrics, best first: a recent window shows recovery after a drift; the running mean lags.
HR_METRICS = ("prequential_hr@10_recent", "prequential_hr@10")
EVENT_TYPES = {"click": event_pb2.EVENT_TYPE_CLICK, "purchase": event_pb2.EVENT_TYPE_PURCHASE}


@dataclass
class Snapshot:
    """What the demo saw at one moment."""

    t: float
    events_sent: int
    events_per_s: float
    phase: int
    served_versions: list[str]
    trainer_hr10: float | None
    hr_metric: str
    taste_match: float | None
    events_learned: int = 0


@dataclass
class DemoResult:
    snapshots: list[Snapshot] = field(default_factory=list)
    drifts: list[float] = field(default_factory=list)
    events_sent: int = 0
    events_accepted: int = 0
    events_rejected: int = 0
    items_upserted: int = 0


class DemoView(Protocol):
    def update(self, snapshot: Snapshot, world: SyntheticWorld, result: DemoResult) -> None: ...


def catalogue_items(world: SyntheticWorld) -> list[item_pb2.Item]:
    return [
        item_pb2.Item(item_id=i.item_id, title=i.title, categories=[i.category], tags=[i.category])
        for i in world.catalogue
    ]


def to_events(events: Sequence[SyntheticEvent], run_id: str, start: int) -> list[event_pb2.Event]:
    now_ns = time.time_ns()
    out = []
    for n, e in enumerate(events, start=start):
        event = event_pb2.Event(
            event_id=f"demo-{run_id}-{n}", user_id=e.user_id, item_id=e.item_id, type=EVENT_TYPES[e.kind]
        )
        event.occurred_at.FromNanoseconds(now_ns)
        out.append(event)
    return out


class Demo:
    """Drives one demo run against running services."""

    def __init__(
        self,
        endpoints: Endpoints,
        world: SyntheticWorld,
        *,
        rate: float,
        drift_every_s: float,
        probe_users: int = 30,
        tick_s: float = 0.25,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.endpoints = endpoints
        self.world = world
        self.rate = rate
        self.drift_every_s = drift_every_s
        self.probe_users = probe_users
        self.tick_s = tick_s
        self.run_id = uuid.uuid4().hex[:8]
        self.result = DemoResult()
        self._channels: list[grpc.aio.Channel] = []

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self.endpoints.channel(address)
        self._channels.append(channel)
        return channel

    async def run(self, duration_s: float, view: DemoView) -> DemoResult:
        e = self.endpoints
        ingest = [
            (a, ingestion_pb2_grpc.IngestionServiceStub(self._channel(a))) for a in e.services["ingestion"]
        ]
        infer = [
            (a, inference_pb2_grpc.InferenceServiceStub(self._channel(a))) for a in e.services["inference"]
        ]
        feature_addr, trainer_addr = e.first("feature"), e.first("trainer")
        feature = feature_pb2_grpc.FeatureServiceStub(self._channel(feature_addr))
        trainer = trainer_pb2_grpc.TrainerServiceStub(self._channel(trainer_addr))
        try:
            await self._publish_catalogue(feature_addr, feature)
            await self._stream(duration_s, view, itertools.cycle(ingest), infer, trainer_addr, trainer)
        finally:
            for channel in self._channels:
                await channel.close()
        return self.result

    async def _publish_catalogue(self, address: str, feature: feature_pb2_grpc.FeatureServiceStub) -> None:
        items = catalogue_items(self.world)
        for offset in range(0, len(items), 500):
            request = feature_pb2.UpsertItemsRequest(items=items[offset : offset + 500])
            response = await call("feature", address, feature.UpsertItems(request, timeout=30))
            if response.errors:
                raise CliError(f"feature rejected catalogue items: {response.errors[0].reason}")
            self.result.items_upserted += response.upserted

    async def _stream(  # noqa: PLR0913
        self,
        duration_s: float,
        view: DemoView,
        ingest: itertools.cycle[tuple[str, ingestion_pb2_grpc.IngestionServiceStub]],
        infer: list[tuple[str, inference_pb2_grpc.InferenceServiceStub]],
        trainer_addr: str,
        trainer: trainer_pb2_grpc.TrainerServiceStub,
    ) -> None:
        start = time.monotonic()
        last_drift = start
        next_report = start + 1.0
        window: list[tuple[float, int]] = [(start, 0)]
        r = self.result
        while True:
            now = time.monotonic()
            if duration_s > 0 and now - start >= duration_s:
                break
            if self.drift_every_s > 0 and now - last_drift >= self.drift_every_s:
                self.world.drift()
                last_drift = now
                r.drifts.append(now - start)
            due = int((now - start) * self.rate) - r.events_sent
            if due > 0:
                address, stub = next(ingest)
                events = to_events(self.world.events(due), self.run_id, r.events_sent)
                request = ingestion_pb2.IngestEventsRequest(events=events)
                response = await call("ingestion", address, stub.IngestEvents(request, timeout=30))
                r.events_sent += len(events)
                r.events_accepted += response.accepted
                r.events_rejected += len(response.errors)
                if response.errors and r.events_accepted == 0:
                    raise CliError(f"ingestion rejected the demo's events: {response.errors[0].reason}")
            if now >= next_report:
                window = [(t, n) for t, n in window if now - t <= 5.0] + [(now, r.events_sent)]
                (t0, n0), (t1, n1) = window[0], window[-1]
                snapshot = await self._snapshot(
                    now - start, (n1 - n0) / max(t1 - t0, 1e-6), infer, trainer_addr, trainer
                )
                r.snapshots.append(snapshot)
                view.update(snapshot, self.world, r)
                next_report += 1.0
            await asyncio.sleep(self.tick_s)

    async def _snapshot(
        self,
        t: float,
        events_per_s: float,
        infer: list[tuple[str, inference_pb2_grpc.InferenceServiceStub]],
        trainer_addr: str,
        trainer: trainer_pb2_grpc.TrainerServiceStub,
    ) -> Snapshot:
        versions = []
        for address, stub in infer:
            info = await call(
                "inference",
                address,
                stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=5),
            )
            versions.append(info.model_version)
        status = await call(
            "trainer",
            trainer_addr,
            trainer.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest(), timeout=5),
        )
        metric = next((m for m in HR_METRICS if m in status.metrics), HR_METRICS[-1])
        hr = status.metrics[metric] if metric in status.metrics else None
        return Snapshot(
            t=t,
            events_sent=self.result.events_sent,
            events_per_s=events_per_s,
            phase=self.world.phase,
            served_versions=versions,
            trainer_hr10=hr,
            hr_metric=metric,
            taste_match=await self._taste_match(infer),
            events_learned=status.events_learned,
        )

    async def _taste_match(
        self, infer: list[tuple[str, inference_pb2_grpc.InferenceServiceStub]]
    ) -> float | None:
        """Share of served top-10 items in the category each probed user's group prefers now."""
        address, stub = infer[0]
        shares = []
        for user in self.world.sample_users(self.probe_users):
            request = inference_pb2.RecommendRequest(user_id=user, k=10)
            response = await call("inference", address, stub.Recommend(request, timeout=5))
            if not response.items:
                continue
            taste = self.world.taste_of(user)
            shares.append(
                sum(self.world.category_of(i.item_id) == taste for i in response.items) / len(response.items)
            )
        return sum(shares) / len(shares) if shares else None
