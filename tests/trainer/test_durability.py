"""A trainer SIGKILLed mid-stream and restarted reaches the prequential figures of one that never
stopped: real subprocesses, a real nats-server, checkpoints on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from freshrec.v1 import trainer_pb2, trainer_pb2_grpc
from tests.conftest import eventually
from tests.feature.helpers import publish
from tests.harness import free_port, wait_serving
from tests.trainer.streams import taste_stream

pytestmark = pytest.mark.slow


def start_trainer(
    nats_url: str, folder: Path, consumer: str, port: int, **changes: str | None
) -> subprocess.Popen[bytes]:
    """A trainer process; ``changes`` set (or, given None, remove) FRESHREC_ variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    env.update(
        {
            "FRESHREC_NATS__URL": nats_url,
            "FRESHREC_GRPC__HOST": "127.0.0.1",
            "FRESHREC_GRPC__PORT": str(port),
            "FRESHREC_METRICS__ENABLED": "false",
            "FRESHREC_DATABASE__URL": f"sqlite:///{folder / 'trainer.db'}",
            "FRESHREC_MODEL_STORE": str(folder / "models"),
            "FRESHREC_CHECKPOINT_DIR": str(folder / "checkpoint"),
            "FRESHREC_CONSUMER_NAME": consumer,
            "FRESHREC_DIM": "16",
            "FRESHREC_MAX_HISTORY": "10",
            "FRESHREC_BLOCKS": "1",
            "FRESHREC_LEARNING_RATE": "0.01",
            "FRESHREC_ONLINE_LEARNING_RATE": "0.01",
            "FRESHREC_MICRO_BATCH": "50",
            "FRESHREC_EXPORT_EVERY_EVENTS": "200",
            "FRESHREC_EXPORT_INTERVAL_S": "3600",
            "FRESHREC_TEXT_FEATURES": "off",
            "FRESHREC_REPLAY_SIZE": "200",
            "FRESHREC_GATE_MIN_EVENTS": "100",
            "FRESHREC_RECENT_WINDOW": "200",
        }
    )
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    log = (folder / "trainer.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.trainer"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    wait_serving(f"127.0.0.1:{port}", 120, process)
    return process


async def status(port: int) -> trainer_pb2.GetTrainerStatusResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await trainer_pb2_grpc.TrainerServiceStub(channel).GetTrainerStatus(
            trainer_pb2.GetTrainerStatusRequest()
        )


async def learned_through(port: int, sequence: int) -> trainer_pb2.GetTrainerStatusResponse:
    async def check() -> trainer_pb2.GetTrainerStatusResponse | None:
        s = await status(port)
        return s if s.watermark.stream_sequence >= sequence else None

    return await eventually(check, timeout_s=180, interval_s=0.02, what=f"sequence {sequence} learned")


async def test_a_killed_trainer_resumes_to_the_figures_of_one_that_never_stopped(
    nats_server, nats_client, tmp_path: Path
) -> None:
    stream = taste_stream(n_users=40, rounds=20)
    n = len(stream)
    steady_dir, killed_dir = tmp_path / "steady", tmp_path / "killed"
    steady_dir.mkdir()
    killed_dir.mkdir()

    # The victim learns the first 500 events (checkpoints at 200 and 400), is killed with 100
    # events learned past its checkpoint and unacked, then the stream goes on while it is down.
    await publish(nats_client, [e for _, e in stream[:500]])
    port = free_port()
    victim = start_trainer(nats_server.url, killed_dir, "killed", port)
    try:
        mid = await learned_through(port, 500)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
    assert mid.watermark.stream_sequence == 500
    saved = torch.load(killed_dir / "checkpoint" / "checkpoint.pt", weights_only=False)
    assert saved["position"]["stream_sequence"] == 400  # 401..500 are lost with the process
    await publish(nats_client, [e for _, e in stream[500:]])

    port = free_port()
    revived = start_trainer(nats_server.url, killed_dir, "killed", port)
    try:
        got = await learned_through(port, n)
    finally:
        revived.terminate()
        revived.wait(30)

    await matches_a_trainer_that_never_stopped(got, nats_server.url, steady_dir, n)


async def matches_a_trainer_that_never_stopped(
    got: trainer_pb2.GetTrainerStatusResponse, nats_url: str, folder: Path, n: int
) -> None:
    """A trainer that never stopped, on the same stream from its own consumer and folder, learns the
    same ``n`` events to the same prequential figures as ``got``."""
    folder.mkdir(exist_ok=True)
    port = free_port()
    steady = start_trainer(nats_url, folder, "steady", port)
    try:
        expected = await learned_through(port, n)
    finally:
        steady.terminate()
        steady.wait(30)
    assert got.events_learned == expected.events_learned == n
    for figure in (
        "prequential_evaluated",
        "prequential_hr@10",
        "prequential_ndcg@10",
        "prequential_hr@10_recent",
    ):
        assert abs(got.metrics[figure] - expected.metrics[figure]) <= 1e-6, figure
    assert expected.metrics["prequential_hr@10_recent"] > 0.5  # it did learn the pattern
