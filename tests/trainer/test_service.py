"""The trainer service on real parts: JetStream in, versions out, the SQL registry, the gate,
automatic rollback, the catalogue follower and the three update schedules."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from freshrec.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.server import TrainerApp
from services.trainer.settings import TrainerSettings
from shared.model_store import ModelStore
from shared.nats import (
    CATALOGUE_ACCEPTED_SUBJECT,
    EVENTS_STREAM,
    MODELS_PUBLISHED_SUBJECT,
    ensure_catalogue_stream,
    ensure_events_stream,
)
from tests.conftest import eventually, service_settings
from tests.factories import event
from tests.feature.helpers import publish
from tests.trainer.streams import catalogue_item, taste_stream

SMALL: dict[str, Any] = {
    "dim": 16,
    "max_history": 10,
    "blocks": 1,
    "learning_rate": 0.01,
    "online_learning_rate": 0.01,
    "micro_batch": 50,
    "micro_batch_wait_s": 0.2,
    "text_features": "off",
    "replay_size": 200,
}
QUIET: dict[str, Any] = {"export_interval_s": 3600.0, "export_every_events": 1_000_000}


class Running:
    def __init__(self, app: TrainerApp, stub: trainer_pb2_grpc.TrainerServiceStub, store: ModelStore) -> None:
        self.app = app
        self.stub = stub
        self.store = store

    async def status(self) -> trainer_pb2.GetTrainerStatusResponse:
        return await self.stub.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())

    async def learned(self, n: int) -> trainer_pb2.GetTrainerStatusResponse:
        async def check() -> trainer_pb2.GetTrainerStatusResponse | None:
            status = await self.status()
            return status if status.watermark.stream_sequence >= n else None

        return await eventually(check, timeout_s=90, what=f"{n} events learned")

    async def export(self, kind: int = trainer_pb2.TRAINING_KIND_EXPORT) -> trainer_pb2.ModelVersion:
        return (await self.stub.TriggerTraining(trainer_pb2.TriggerTrainingRequest(kind=kind))).model

    async def sabotage(self) -> None:
        """The learner forgets what it knew (as a poisoned or diverged update would make it)."""
        async with self.app.loop.lock:  # type: ignore[union-attr]
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in self.app.loop.learner.model.parameters():  # type: ignore[union-attr]
                    p.add_(torch.randn(p.shape, generator=generator) * 3.0)


@pytest.fixture
async def trainer(nats_server, tmp_path: Path) -> AsyncIterator[Any]:
    apps: list[TrainerApp] = []
    channels: list[grpc.aio.Channel] = []

    async def start(**overrides: Any) -> Running:
        settings = service_settings(TrainerSettings, nats_server, tmp_path, **{**SMALL, **overrides})
        app = TrainerApp(settings)
        await app.start()
        apps.append(app)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        channels.append(channel)
        return Running(app, trainer_pb2_grpc.TrainerServiceStub(channel), ModelStore(tmp_path / "models"))

    yield start
    for channel in channels:
        await channel.close()
    for app in apps:
        await app.stop()


async def announcements(nats_client) -> list[trainer_pb2.ModelAnnouncement]:  # type: ignore[no-untyped-def]
    seen: list[trainer_pb2.ModelAnnouncement] = []

    async def collect(msg) -> None:  # type: ignore[no-untyped-def]
        seen.append(trainer_pb2.ModelAnnouncement.FromString(msg.data))

    await nats_client.subscribe(MODELS_PUBLISHED_SUBJECT, cb=collect)
    return seen


async def test_versions_flow_out_and_the_registry_promotes_and_rolls_back(trainer, nats_client) -> None:
    heard = await announcements(nats_client)
    stream = taste_stream(n_users=10, rounds=3)
    await publish(nats_client, [e for _, e in stream])
    t = await trainer(export_interval_s=0.2)

    async def published() -> trainer_pb2.GetTrainerStatusResponse | None:
        status = await t.status()
        return status if status.watermark.stream_sequence == len(stream) and status.live_version else None

    status = await eventually(published, timeout_s=90, what="every event learned and a version live")
    assert t.store.live_version() == status.live_version
    assert status.strategy == "online" and status.events_learned == len(stream)
    assert status.metrics["prequential_evaluated"] == len(stream)
    assert {"prequential_hr@10", "prequential_hr@10_recent", "items", "users"} <= set(status.metrics)

    first = await t.export()
    assert first.status == trainer_pb2.MODEL_STATUS_LIVE and first.parent_version == status.live_version
    listed = await t.stub.ListModels(trainer_pb2.ListModelsRequest())
    assert listed.live_version == first.version
    assert [m.status for m in listed.models][:2] == [
        trainer_pb2.MODEL_STATUS_LIVE,
        trainer_pb2.MODEL_STATUS_RETIRED,
    ]

    rolled = await t.stub.RollbackModel(trainer_pb2.RollbackModelRequest())
    assert (rolled.model.version, rolled.previous_version) == (first.parent_version, first.version)
    assert t.store.live_version() == first.parent_version
    promoted = await t.stub.PromoteModel(trainer_pb2.PromoteModelRequest(version=first.version))
    assert promoted.model.version == first.version and t.store.live_version() == first.version
    # Wait for the promotion's own announcement: three arriving does not mean it has.
    await eventually(lambda: _true("promoted" in [a.reason for a in heard]), what="announcements")
    reasons = [a.reason for a in heard]
    assert reasons[reasons.index("rolled_back") :][:2] == ["rolled_back", "promoted"]

    for request, code in [
        (trainer_pb2.PromoteModelRequest(version="v999999"), grpc.StatusCode.NOT_FOUND),
        (trainer_pb2.PromoteModelRequest(version=""), grpc.StatusCode.INVALID_ARGUMENT),
        (trainer_pb2.PromoteModelRequest(version="v" * 65), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await t.stub.PromoteModel(request)
        assert caught.value.code() == code and caught.value.details()

    # A restart resumes from the checkpoint and learns nothing twice.
    await t.app.stop()
    t = await trainer(export_interval_s=0.2)
    status = await t.status()
    assert status.events_learned == len(stream) and status.live_version == first.version


async def _true(value: bool) -> bool:
    return value


async def test_a_worse_candidate_is_rejected_and_learning_resumes_from_the_live_weights(
    trainer, nats_client
) -> None:
    heard = await announcements(nats_client)
    stream = taste_stream(n_users=40, rounds=24)
    await publish(nats_client, [e for _, e in stream[:640]])
    t = await trainer(gate_min_events=50, gate_tolerance=0.02, **QUIET)
    await t.learned(640)
    live = await t.export()
    assert live.status == trainer_pb2.MODEL_STATUS_LIVE

    await t.sabotage()
    await publish(nats_client, [e for _, e in stream[640:]])
    status = await t.learned(len(stream))
    assert status.metrics["gate_events"] >= 50
    assert status.metrics["gate_learner_hr@10"] < status.metrics["gate_live_hr@10"]
    rejected = await t.export()
    assert rejected.status == trainer_pb2.MODEL_STATUS_REJECTED and rejected.parent_version == live.version
    assert rejected.metrics["gate_candidate_hr@10"] < rejected.metrics["gate_live_hr@10"]
    assert t.store.live_version() == live.version  # stored, never published
    assert rejected.version in t.store.list_versions()
    assert rejected.version not in {a.version for a in heard}
    listed = await t.stub.ListModels(trainer_pb2.ListModelsRequest())
    assert listed.live_version == live.version

    # Learning continued from the live version's weights: the next candidate matches it.
    learner = t.app.loop.learner  # type: ignore[union-attr]
    shadow = learner.shadows["live"].model.state_dict()
    mine = learner.model.state_dict()
    assert all(torch.equal(shadow[k], mine[k]) for k in ("blocks.0.qkv.weight", "norm.weight"))


async def test_a_sustained_regression_of_the_live_version_rolls_it_back(trainer, nats_client) -> None:
    heard = await announcements(nats_client)
    stream = taste_stream(n_users=40, rounds=24)
    await publish(nats_client, [e for _, e in stream[:640]])
    t = await trainer(gate=False, rollback_min_events=60, rollback_patience=2, **QUIET)
    await t.learned(640)
    good = await t.export()
    await t.sabotage()
    bad = await t.export()  # the gate is off: the worse version goes live
    assert bad.status == trainer_pb2.MODEL_STATUS_LIVE and bad.parent_version == good.version
    await publish(nats_client, [e for _, e in stream[640:]])

    async def rolled_back() -> bool:
        # The store's pointer moves first; the announcement follows it over NATS.
        announced = [a.reason for a in heard if a.version == good.version]
        return t.store.live_version() == good.version and announced[-1] == "rolled_back_regression"

    await eventually(rolled_back, timeout_s=90, what="the automatic rollback, announced")
    listed = await t.stub.ListModels(trainer_pb2.ListModelsRequest())
    assert listed.live_version == good.version
    assert {m.version: m.status for m in listed.models}[bad.version] == trainer_pb2.MODEL_STATUS_RETIRED


async def test_catalogue_entries_reach_the_next_export_before_any_event(trainer, nats_client) -> None:
    js = nats_client.jetstream()
    await ensure_catalogue_stream(js)
    for item in (catalogue_item("brand-new", ["drama"], ["slow"]), catalogue_item("a1", ["drama"])):
        await js.publish(CATALOGUE_ACCEPTED_SUBJECT, item.SerializeToString())
    stream = taste_stream(n_users=6, rounds=2)
    await publish(nats_client, [e for _, e in stream])
    t = await trainer(**QUIET)
    await t.learned(len(stream))

    async def catalogued() -> bool:
        return t.app.loop.learner.position.catalogue_sequence >= 2  # type: ignore[union-attr]

    await eventually(catalogued, what="the catalogue followed")
    version = await t.export()
    files = t.store.open_verified(version.version).path
    item_ids = json.loads((files / "item_ids.json").read_text())
    assert "brand-new" in item_ids
    vocab = json.loads((files / "content_vocab.json").read_text())
    assert "drama" in vocab["categories"] and "slow" in vocab["tags"]


@pytest.mark.parametrize(
    "schedule",
    [
        {"strategy": "incremental", "incremental_window_events": 120, "incremental_epochs": 1},
        {
            "strategy": "periodic",
            "periodic_interval_s": 0.5,
            "retrain_epochs": 1,
            "export_interval_s": 3600.0,
        },
    ],
    ids=["incremental", "periodic"],
)
async def test_incremental_and_periodic_schedules_publish_through_the_same_path(
    trainer, nats_client, schedule: dict[str, Any]
) -> None:
    stream = taste_stream(n_users=20, rounds=8)
    await publish(nats_client, [e for _, e in stream])
    t = await trainer(gate_holdout_events=40, **schedule)

    async def published() -> trainer_pb2.GetTrainerStatusResponse | None:
        status = await t.status()
        return status if status.live_version and status.watermark.stream_sequence == len(stream) else None

    status = await eventually(published, timeout_s=90, what=f"a {schedule['strategy']} version")
    assert status.strategy == schedule["strategy"]
    assert status.metrics["prequential_evaluated"] == len(stream)
    # Retraining from the event log on demand works under every schedule.
    retrained = await t.export(trainer_pb2.TRAINING_KIND_RETRAIN)
    assert retrained.status in (trainer_pb2.MODEL_STATUS_LIVE, trainer_pb2.MODEL_STATUS_REJECTED)
    assert retrained.trained_through.stream_sequence == len(stream)


async def test_with_a_retention_the_export_forgets_users_the_log_no_longer_holds(
    trainer, nats_client
) -> None:
    """The trainer reads where FRESHREC_EVENTS begins (ingestion keeps it for the retention) and,
    before an export, erases the users with nothing left in it."""
    js = nats_client.jetstream()
    await ensure_events_stream(js, max_age_s=2.0)
    await publish(nats_client, [event("leaver", f"i{n % 5}", event_id=f"a{n}") for n in range(20)])
    running = await trainer(**QUIET, retention={"events": 2.0})
    await running.learned(20)
    learner = running.app.loop.learner  # type: ignore[union-attr]
    assert "leaver" in learner.user_last_sequence

    async def expired() -> bool:
        return (await js.stream_info(EVENTS_STREAM)).state.messages == 0

    await eventually(expired, what="the leaver's events aged out of the stream")
    await publish(nats_client, [event("stayer", f"i{n % 5}", event_id=f"b{n}") for n in range(20)])
    await running.learned(40)
    await running.export()
    assert "leaver" not in learner.user_last_sequence and "leaver" not in learner.histories
    assert learner.users.get("leaver") == 0 and "stayer" in learner.histories
    status = await running.status()
    assert status.watermark.stream_sequence == 40


async def test_old_artifacts_are_pruned_and_promoting_one_says_so(trainer, nats_client) -> None:
    stream = taste_stream(n_users=10, rounds=3)
    await publish(nats_client, [e for _, e in stream])
    t = await trainer(keep_versions=2, **QUIET)
    await t.learned(len(stream))
    versions = [(await t.export()).version for _ in range(4)]
    # The newest two, plus the live one's parent and grandparent, kept for rollback.
    assert t.store.list_versions() == versions[1:]
    await t.export()
    assert t.store.list_versions() == versions[2:] + [t.store.live_version()]
    listed = await t.stub.ListModels(trainer_pb2.ListModelsRequest())
    assert versions[0] in {m.version for m in listed.models}  # still in the registry
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await t.stub.PromoteModel(trainer_pb2.PromoteModelRequest(version=versions[0]))
    assert (
        caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and versions[0] in caught.value.details()
    )
