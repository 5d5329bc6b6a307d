"""``python -m services.trainer pretrain``: from a MovieLens-style file or the event stream, with
progress output, into the checkpoint and the first live version the service then fine-tunes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from freshrec.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.registry import CheckpointFile
from services.trainer.server import TrainerApp
from services.trainer.settings import TrainerSettings
from shared.model_store import ModelStore
from tests.conftest import eventually, service_settings
from tests.feature.helpers import publish
from tests.trainer.streams import T0, taste_stream

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def pretrain(folder: Path, nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    env.update(
        {
            "FRESHREC_NATS__URL": nats_url,
            "FRESHREC_DATABASE__URL": f"sqlite:///{folder / 'trainer.db'}",
            "FRESHREC_MODEL_STORE": str(folder / "models"),
            "FRESHREC_CHECKPOINT_DIR": str(folder / "checkpoint"),
            "FRESHREC_DIM": "16",
            "FRESHREC_MAX_HISTORY": "10",
            "FRESHREC_BLOCKS": "1",
            "FRESHREC_TEXT_FEATURES": "off",
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "services.trainer", "pretrain", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def write_movielens(folder: Path) -> tuple[Path, Path]:
    ratings = folder / "ratings.csv"
    lines = ["userId,movieId,rating,timestamp"]
    for seq, e in taste_stream(n_users=20, rounds=10):
        lines.append(f"{e.user_id},{e.item_id},4.0,{T0 + seq}")
    ratings.write_text("\n".join(lines) + "\n")
    movies = folder / "movies.csv"
    rows = ["movieId,title,genres"]
    for group in "ab":
        rows += [
            f'{group}{i},"Film {group}{i} ({1990 + i % 10})",{"Drama" if group == "a" else "Action"}'
            for i in range(60)
        ]
    rows.append('fresh,"A Brand New Film (2024)",Drama')
    movies.write_text("\n".join(rows) + "\n")
    return ratings, movies


async def test_pretrain_from_a_file_then_the_service_learns_on_from_it(
    nats_server, nats_client, tmp_path
) -> None:
    ratings, movies = write_movielens(tmp_path)
    done = pretrain(
        tmp_path,
        nats_server.url,
        "--source",
        "file",
        "--file",
        str(ratings),
        "--items",
        str(movies),
        "--epochs",
        "3",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 3/3" in done.stderr and "published v000001" in done.stderr
    store = ModelStore(tmp_path / "models")
    assert store.live_version() == "v000001"
    saved = torch.load(CheckpointFile(tmp_path / "checkpoint").path, weights_only=False)
    assert saved["position"]["events_learned"] == 200 and saved["position"]["stream_sequence"] == 0
    item_ids = (store.versions_dir / "v000001" / "item_ids.json").read_text()
    assert '"fresh"' in item_ids  # a catalogue item nobody touched, by its content

    # A second pretrain beside a running service is refused: one writer per checkpoint.
    settings = service_settings(
        TrainerSettings,
        nats_server,
        tmp_path,
        dim=16,
        max_history=10,
        blocks=1,
        text_features="off",
        export_interval_s=0.2,
    )
    app = TrainerApp(settings)
    await app.start()
    try:
        refused = pretrain(tmp_path, nats_server.url, "--source", "file", "--file", str(ratings))
        assert refused.returncode == 2 and "stop it first" in refused.stderr
        live = taste_stream(n_users=20, rounds=2, start_seq=1)
        for _, e in live:
            e.event_id = f"live-{e.event_id}"
        await publish(nats_client, [e for _, e in live])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)

            async def continued() -> trainer_pb2.GetTrainerStatusResponse | None:
                status = await stub.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())
                return (
                    status
                    if status.watermark.stream_sequence == len(live) and status.live_version > "v000001"
                    else None
                )

            status = await eventually(
                continued, timeout_s=90, what="online learning on top of the pretrained model"
            )
        assert status.events_learned == 200 + len(live)
        listed = ModelStore(tmp_path / "models").list_versions()
        assert listed[0] == "v000001" and len(listed) >= 2
    finally:
        await app.stop()


async def test_pretrain_from_the_event_stream(nats_server, nats_client, tmp_path) -> None:
    stream = taste_stream(n_users=10, rounds=5)
    await publish(nats_client, [e for _, e in stream])
    done = pretrain(tmp_path, nats_server.url, "--epochs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"read {len(stream)} events" in done.stderr
    saved = torch.load(CheckpointFile(tmp_path / "checkpoint").path, weights_only=False)
    assert saved["position"]["stream_sequence"] == len(stream)  # the service continues after it
    assert ModelStore(tmp_path / "models").live_version() == "v000001"
