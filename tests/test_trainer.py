"""The trainer on real parts: torch learning, ONNX export checked by onnxruntime, the model store,
the SQL registry, checkpoints, and the service fed by JetStream."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch

from freshrec.v1 import event_pb2, trainer_pb2, trainer_pb2_grpc
from services.trainer.export import USER_TOWER, export_learner
from services.trainer.learner import OnlineLearner
from services.trainer.registry import next_version
from services.trainer.server import TrainerApp
from services.trainer.settings import TrainerSettings
from shared.model_store import ModelStore
from tests.conftest import eventually, service_settings
from tests.factories import event
from tests.test_feature import publish


def taste_stream(n_users: int = 40, rounds: int = 6, start_seq: int = 1) -> list[tuple[int, event_pb2.Event]]:
    """Users in two groups, each clicking through its own 20 items: a pattern a model can learn."""
    out = []
    seq = start_seq
    for r in range(rounds):
        for u in range(n_users):
            group = u % 2
            item = f"{'ab'[group]}{(u + r * 3) % 20}"
            out.append((seq, event(f"u{u}", item, at=1_700_000_000 + seq)))
            seq += 1
    return out


def test_learner_learns_a_pattern_and_reports_prequential_figures() -> None:
    learner = OnlineLearner(dim=16, max_history=10, learning_rate=0.05)
    stream = taste_stream(rounds=30)
    for start in range(0, len(stream), 64):
        learner.learn(stream[start : start + 64])
    metrics = learner.state.prequential.as_metrics()
    assert learner.state.events_learned == len(stream)
    assert metrics["prequential_evaluated"] == len(stream)
    # 40 candidate items, seen ones excluded: random would hit about 10/30 late in the stream.
    assert metrics["prequential_hr@10"] > 0.5
    # Replaying what it already holds changes nothing.
    assert learner.learn(stream[:64]) == 0


@pytest.mark.parametrize("batch", [1, 64])
def test_onnx_export_matches_torch(batch: int) -> None:
    learner = OnlineLearner(dim=16, max_history=10, learning_rate=0.05)
    learner.learn(taste_stream())
    exported = export_learner(learner, parent_version=None)
    session = ort.InferenceSession(exported.files[USER_TOWER], providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    history = rng.integers(0, len(learner.state.item_map), size=(batch, 10))
    users = rng.integers(0, len(learner.state.user_map), size=(batch,))
    (got,) = session.run(None, {"history": history, "user": users})
    with torch.no_grad():
        expected = learner.model(torch.from_numpy(history), torch.from_numpy(users)).numpy()
    assert np.abs(got - expected).max() < 1e-4
    matrix = np.load(io.BytesIO(exported.files["item_embeddings.npy"]))
    assert matrix.shape == (len(learner.state.item_map), 16)
    assert json.loads(exported.files["item_ids.json"])[0] == ""
    assert exported.manifest["trained_through"]["stream_sequence"] == 240


def test_checkpoint_restores_the_same_learner() -> None:
    stream = taste_stream(rounds=8)
    a = OnlineLearner(dim=16, max_history=10, learning_rate=0.05)
    a.learn(stream[:160])
    b = OnlineLearner(dim=16, max_history=10, learning_rate=0.05, seed=7)
    b.restore(a.checkpoint_bytes())
    a.learn(stream[160:])
    b.learn(stream[150:])  # a redelivery overlapping what the checkpoint holds
    assert a.state.events_learned == b.state.events_learned == len(stream)
    assert a.state.prequential == b.state.prequential
    for name, tensor in a.model.state_dict().items():
        assert torch.allclose(tensor, b.model.state_dict()[name]), name


def test_versions_sort_in_creation_order() -> None:
    assert next_version([]) == "v000001"
    assert next_version(["v000009", "v000010", "junk"]) == "v000011"


async def test_trainer_service_publishes_versions_and_manages_the_registry(
    nats_server, nats_client, tmp_path
) -> None:
    settings = service_settings(
        TrainerSettings, nats_server, tmp_path, export_interval_s=0.2, dim=8, micro_batch=50
    )
    stream = [e for _, e in taste_stream(n_users=10, rounds=3)]
    for n, e in enumerate(stream):
        e.event_id = f"t{n}"
    announcements = []

    async def collect(msg):  # type: ignore[no-untyped-def]
        announcements.append(msg)

    await nats_client.subscribe("freshrec.models.published", cb=collect)
    await publish(nats_client, stream)

    app = TrainerApp(settings)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    stub = trainer_pb2_grpc.TrainerServiceStub(channel)

    async def published():  # type: ignore[no-untyped-def]
        status = await stub.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())
        return status if status.events_learned == len(stream) and status.live_version else None

    status = await eventually(published, what="every event learned and a version live")
    store = ModelStore(tmp_path / "models")
    assert store.live_version() == status.live_version
    assert status.metrics["prequential_evaluated"] == len(stream)
    assert status.watermark.stream_sequence == len(stream)

    first = (await stub.TriggerTraining(trainer_pb2.TriggerTrainingRequest())).model
    assert first.status == trainer_pb2.MODEL_STATUS_LIVE and first.parent_version == status.live_version
    listed = await stub.ListModels(trainer_pb2.ListModelsRequest())
    assert listed.live_version == first.version
    assert [m.status for m in listed.models][:2] == [
        trainer_pb2.MODEL_STATUS_LIVE,
        trainer_pb2.MODEL_STATUS_RETIRED,
    ]

    rolled = await stub.RollbackModel(trainer_pb2.RollbackModelRequest())
    assert (rolled.model.version, rolled.previous_version) == (first.parent_version, first.version)
    assert store.live_version() == first.parent_version
    promoted = await stub.PromoteModel(trainer_pb2.PromoteModelRequest(version=first.version))
    assert promoted.model.version == first.version and store.live_version() == first.version

    def reasons() -> list[str]:
        return [trainer_pb2.ModelAnnouncement.FromString(m.data).reason for m in announcements]

    async def announced() -> bool:
        # Wait for the last one: three arriving does not mean the promotion's has.
        return "promoted" in reasons()

    await eventually(announced, what="announcements")
    heard = reasons()
    assert heard[heard.index("rolled_back") :][:2] == ["rolled_back", "promoted"]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.PromoteModel(trainer_pb2.PromoteModelRequest(version="v999999"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await channel.close()
    await app.stop()

    # Restart: resumes from the checkpoint, learns nothing twice.
    app = TrainerApp(settings)
    await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        status = await trainer_pb2_grpc.TrainerServiceStub(channel).GetTrainerStatus(
            trainer_pb2.GetTrainerStatusRequest()
        )
        assert status.events_learned == len(stream)
    await app.stop()
