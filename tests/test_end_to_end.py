"""The whole path on real parts: the embedded stack as `make run` starts it (real processes,
nats-server, SQLite, gRPC, onnxruntime), fed over gRPC and NATS."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import nats
import pytest

from cli.stack import Stack
from freshrec.v1 import (
    event_pb2,
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from shared.signing import generate_keypair
from tests.conftest import eventually
from tests.factories import event

pytestmark = pytest.mark.slow

USERS = [f"user-{u}" for u in range(6)]
# Two taste groups: even users like the "a" items, odd users the "b" items.
ITEMS = {0: [f"a{i}" for i in range(12)], 1: [f"b{i}" for i in range(12)]}


def events_for(round_: int, start_at: float) -> list[event_pb2.Event]:
    out = []
    for u, user in enumerate(USERS):
        for i, item in enumerate(ITEMS[u % 2][round_ * 4 : round_ * 4 + 4]):
            out.append(event(user, item, event_id=f"{user}-{item}", at=start_at + u * 10 + i))
    return out


@pytest.fixture
def stack(tmp_path: Path):
    # Models are signed by the trainer and verified by inference, as a production setup would.
    private_key, public_key = generate_keypair(tmp_path / "keys")
    s = Stack(
        tmp_path / "var",
        ports={"nats": 0, "ingestion": 0, "feature": 0, "trainer": 0, "inference": 0},
        extra_env={
            "trainer": {
                "FRESHREC_EXPORT_INTERVAL_S": "1",
                "FRESHREC_MICRO_BATCH": "32",
                "FRESHREC_SIGNING_KEY_FILE": str(private_key),
            },
            "inference": {"FRESHREC_POLL_INTERVAL_S": "30", "FRESHREC_VERIFY_KEY_FILE": str(public_key)},
        },
        log_dir=tmp_path / "logs",
    )
    s.start()
    yield s
    s.stop()


async def test_events_in_over_grpc_and_nats_recommendations_out(stack: Stack) -> None:
    now = time.time() - 3600
    first = events_for(0, now)
    over_grpc, over_nats = first[: len(first) // 2], first[len(first) // 2 :]

    async with grpc.aio.insecure_channel(stack.address("ingestion")) as ch:
        response = await ingestion_pb2_grpc.IngestionServiceStub(ch).IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=over_grpc)
        )
    assert response.accepted == len(over_grpc) and not response.errors

    nc = await nats.connect(stack.nats.url)
    js = nc.jetstream()
    for e in over_nats:
        await js.publish("freshrec.events.raw", e.SerializeToString())
    await nc.close()

    inference = grpc.aio.insecure_channel(stack.address("inference"))
    trainer = grpc.aio.insecure_channel(stack.address("trainer"))
    infer = inference_pb2_grpc.InferenceServiceStub(inference)
    train = trainer_pb2_grpc.TrainerServiceStub(trainer)
    inference_pid = stack.services["inference"].process.pid

    async def learned_everything() -> bool:
        status = await train.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())
        return status.events_learned >= len(first) and bool(status.live_version)

    await eventually(learned_everything, timeout_s=60, what="the trainer to learn every event and publish")

    async def served_version(min_sequence: int):  # type: ignore[no-untyped-def]
        info = await infer.GetModelInfo(inference_pb2.GetModelInfoRequest())
        done = info.model_version and info.trained_through.stream_sequence >= min_sequence
        return info if done else None

    info = await eventually(lambda: served_version(len(first)), timeout_s=30, what="a model covering round 1")
    first_version = info.model_version

    for user in USERS:
        response = await infer.Recommend(inference_pb2.RecommendRequest(user_id=user, k=3))
        seen = {e.item_id for e in first if e.user_id == user}
        assert len(response.items) == 3
        assert response.model_version == first_version
        assert response.trained_through.stream_sequence >= len(first)
        assert not seen & {i.item_id for i in response.items}, "recommended an item the user has seen"
        assert all(i.source == inference_pb2.RECOMMENDATION_SOURCE_MODEL for i in response.items)

    # More events arrive: the same inference process swaps in a newer version.
    second = events_for(1, now + 1000)
    async with grpc.aio.insecure_channel(stack.address("ingestion")) as ch:
        response = await ingestion_pb2_grpc.IngestionServiceStub(ch).IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=second)
        )
    assert response.accepted == len(second)
    total = len(first) + len(second)
    info = await eventually(lambda: served_version(total), timeout_s=60, what="a model covering round 2")
    assert info.model_version > first_version
    assert stack.services["inference"].process.pid == inference_pid, (
        "inference restarted instead of hot-swapping"
    )

    response = await infer.Recommend(inference_pb2.RecommendRequest(user_id=USERS[0], k=5))
    assert response.model_version == info.model_version
    seen = {e.item_id for e in first + second if e.user_id == USERS[0]}
    assert not seen & {i.item_id for i in response.items}

    # An unknown user is not an error: cold-start items from popularity, labelled as such.
    response = await infer.Recommend(inference_pb2.RecommendRequest(user_id="nobody", k=3))
    assert len(response.items) == 3
    assert all(i.source == inference_pb2.RECOMMENDATION_SOURCE_COLD_START for i in response.items)
    await inference.close()
    await trainer.close()
