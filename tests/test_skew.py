"""What the trainer says was served is what inference answered, event by event.

Ingestion, feature, trainer and inference run in-process on real NATS and SQLite. A client asks
``Recommend`` for each user of a call before sending the call's events (a call may hold several
events of one user, which one answer preceded), exactly as ``bench/live.py`` does; the trainer
scores the same events with the live version. The rank of every event's item in the answer
(from NDCG@10) must agree, so the trainer's served figure, its gate and its rollbacks judge what
users get.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from freshrec.v1 import (
    feature_pb2,
    feature_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.feature.server import FeatureApp
from services.feature.settings import FeatureSettings
from services.inference.server import InferenceApp
from services.inference.settings import InferenceSettings
from services.ingestion.server import IngestionApp
from services.ingestion.settings import IngestionSettings
from services.trainer.server import TrainerApp
from services.trainer.settings import TrainerSettings
from tests.conftest import eventually, service_settings
from tests.factories import event
from tests.trainer.streams import T0, catalogue_item

pytestmark = pytest.mark.slow

TRAINER = {
    "dim": 16,
    "max_history": 10,
    "blocks": 1,
    "learning_rate": 0.01,
    "online_learning_rate": 0.01,
    "micro_batch": 40,
    "micro_batch_wait_s": 0.2,
    "text_features": "off",
    "replay_size": 200,
    "bootstrap": False,
    "export_interval_s": 3600.0,
    "export_every_events": 1_000_000,
}


class Stack:
    def __init__(self, apps: dict[str, Any], channels: dict[str, grpc.aio.Channel]) -> None:
        self.apps = apps
        self.ingestion = ingestion_pb2_grpc.IngestionServiceStub(channels["ingestion"])
        self.feature = feature_pb2_grpc.FeatureServiceStub(channels["feature"])
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(channels["trainer"])
        self.inference = inference_pb2_grpc.InferenceServiceStub(channels["inference"])

    async def ingest(self, events: list[Any]) -> None:
        response = await self.ingestion.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events))
        assert response.accepted == len(events), response.errors

    async def visible(self, n: int) -> None:
        """Until the feature service has applied the first n events."""

        async def applied() -> bool:
            answer = await self.feature.GetPopularItems(feature_pb2.GetPopularItemsRequest(k=1))
            return answer.watermark.stream_sequence >= n

        await eventually(applied, timeout_s=30, interval_s=0.01, what=f"{n} events applied")

    async def learned(self, n: int) -> trainer_pb2.GetTrainerStatusResponse:
        async def check() -> trainer_pb2.GetTrainerStatusResponse | None:
            s = await self.trainer.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())
            return s if s.watermark.stream_sequence >= n else None

        return await eventually(check, timeout_s=60, what=f"{n} events learned")


@pytest.fixture
async def stack(nats_server: Any, tmp_path: Path) -> AsyncIterator[Stack]:
    apps: dict[str, Any] = {}
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        apps["ingestion"] = IngestionApp(
            service_settings(IngestionSettings, nats_server, tmp_path, earliest_time="1990-01-01T00:00:00Z")
        )
        apps["feature"] = FeatureApp(service_settings(FeatureSettings, nats_server, tmp_path))
        apps["trainer"] = TrainerApp(service_settings(TrainerSettings, nats_server, tmp_path, **TRAINER))
        for name in ("ingestion", "feature", "trainer"):
            await apps[name].start()
        apps["inference"] = InferenceApp(
            service_settings(
                InferenceSettings, nats_server, tmp_path, feature_addr=f"127.0.0.1:{apps['feature'].port}"
            )
        )
        await apps["inference"].start()
        for name, app in apps.items():
            channels[name] = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        yield Stack(apps, channels)
    finally:
        for channel in channels.values():
            await channel.close()
        for app in reversed(list(apps.values())):
            await app.stop()


def taste_calls(n_users: int, rounds: int, seed: int) -> list[list[Any]]:
    """Calls of one to three events of one user: two taste groups with an order inside each, and
    a few newcomers, so answers come from the model and from the policy's fallbacks."""
    rng = random.Random(seed)
    groups = {0: [f"a{i}" for i in range(30)], 1: [f"b{i}" for i in range(30)]}
    calls, n = [], 0
    for r in range(rounds):
        users = [f"u{u}" for u in range(n_users)] + [f"new{r}-{k}" for k in range(3)]
        rng.shuffle(users)
        for user in users:
            items = groups[int(user[-1]) % 2]
            start = rng.randrange(len(items) - 3)
            size = rng.choice((1, 1, 2, 3))
            call = []
            for item in items[start : start + size]:
                n += 1
                call.append(event(user, item, event_id=f"e{n}", at=T0 + n))
            calls.append(call)
    return calls


async def test_the_trainer_served_figure_is_what_inference_answered(stack: Stack) -> None:
    items = [catalogue_item(f"{g}{i}", [g]) for g in "ab" for i in range(30)]
    await stack.feature.UpsertItems(feature_pb2.UpsertItemsRequest(items=items))
    calls = taste_calls(n_users=20, rounds=12, seed=0)
    warm = [e for call in calls[:150] for e in call]
    for start in range(0, len(warm), 100):
        await stack.ingest(warm[start : start + 100])
    await stack.learned(len(warm))
    live = (await stack.trainer.TriggerTraining(trainer_pb2.TriggerTrainingRequest())).model
    assert live.status == trainer_pb2.MODEL_STATUS_LIVE

    async def serving() -> bool:
        info = await stack.inference.GetModelInfo(inference_pb2.GetModelInfoRequest())
        return info.model_version == live.version

    await eventually(serving, timeout_s=30, what=f"{live.version} served")

    # The client's side: an answer per call, then the call's events.
    ranks: dict[int, int] = {}
    sent = len(warm)
    for call in calls[150:]:
        await stack.visible(sent)
        answer = await stack.inference.Recommend(
            inference_pb2.RecommendRequest(user_id=call[0].user_id, k=10)
        )
        assert answer.model_version == live.version
        shown = [i.item_id for i in answer.items]
        for e in call:
            sent += 1
            ranks[sent] = shown.index(e.item_id) if e.item_id in shown else -1
        await stack.ingest(call)
    await stack.learned(sent)

    # The trainer's side: the same events, as it says the live version served them.
    learner = stack.apps["trainer"].loop.learner
    scored = {seq: (hr, ndcg) for seq, hr, ndcg in learner.served_events}
    # Rapid repeats (same user and item within seconds) are collapsed, not scored.
    common = set(ranks) & set(scored)
    assert len(common) >= 0.97 * len(ranks)
    agree = 0
    for seq in common:
        rank = ranks[seq]
        hr, ndcg = scored[seq]
        trainer_rank = round(2 ** (1 / ndcg) - 2) if ndcg > 0 else -1
        agree += int(trainer_rank == rank and math.isclose(hr, float(rank >= 0)))
    assert agree >= 0.97 * len(common), f"{agree} of {len(common)} events ranked alike"
    hits = sum(r >= 0 for r in ranks.values())
    assert 0 < hits < len(ranks)  # a figure worth comparing: neither nothing nor everything
