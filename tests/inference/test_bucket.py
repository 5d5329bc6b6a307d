"""Trainer and inference sharing no folder: versions travel through the JetStream Object Store, and
every replica serves what the KV pointer names (exports, a rollback), keeping on its disk only the
versions it has loaded."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc

from freshrec.v1 import inference_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.inference.server import InferenceApp
from services.inference.settings import InferenceSettings
from services.trainer.server import TrainerApp
from services.trainer.settings import TrainerSettings
from shared.model_bucket import MODELS_BUCKET, ModelBucket
from shared.model_store import ModelStore
from shared.nats import connect
from shared.settings import NatsSettings
from tests.conftest import eventually, service_settings
from tests.harness import cluster_nodes
from tests.inference.conftest import Starter, publish_events, wait_serving
from tests.inference.test_trainer_exports import write_model
from tests.trainer.streams import taste_stream
from tests.trainer.test_service import QUIET, SMALL


async def test_replicas_on_other_disks_serve_each_live_version(
    nats_server: Any, nats_client: Any, tmp_path: Path, start_inference: Starter
) -> None:
    stream = taste_stream(n_users=10, rounds=3)
    await publish_events(nats_client, [e for _, e in stream])
    settings = service_settings(
        TrainerSettings, nats_server, tmp_path, model_store=None, **{**SMALL, **QUIET}
    )
    trainer = TrainerApp(settings)
    await trainer.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{trainer.port}")
    stub = trainer_pb2_grpc.TrainerServiceStub(channel)
    try:

        async def learned() -> bool:
            status = await stub.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())
            return status.watermark.stream_sequence == len(stream)

        await eventually(learned, timeout_s=90, what="the stream learned")
        export = trainer_pb2.TriggerTrainingRequest(kind=trainer_pb2.TRAINING_KIND_EXPORT)
        first = (await stub.TriggerTraining(export)).model
        # No folder is shared: each replica downloads into its own.
        caches = [tmp_path / "replica-a", tmp_path / "replica-b"]
        replicas = [await start_inference(model_store=None, model_cache=cache) for cache in caches]
        assert not (tmp_path / "models").exists()
        for _app, inference in replicas:
            await wait_serving(inference, first.version)

        second = (await stub.TriggerTraining(export)).model
        assert second.status == trainer_pb2.MODEL_STATUS_LIVE
        for _app, inference in replicas:
            await wait_serving(inference, second.version)
        rolled = await stub.RollbackModel(trainer_pb2.RollbackModelRequest())
        assert rolled.model.version == first.version
        for (app, inference), cache in zip(replicas, caches, strict=True):
            await wait_serving(inference, first.version)
            assert (
                set(ModelStore(cache).list_versions())
                <= set(app.holder.loaded)
                == {first.version, second.version}
            )

        bucket = await ModelBucket.open(nats_client.jetstream())
        assert await bucket.live_version() == first.version
        assert await bucket.list_versions() == [first.version, second.version]
    finally:
        await channel.close()
        await trainer.stop()


async def test_the_kv_pointer_alone_brings_a_version_in(
    nats_client: Any, tmp_path: Path, start_inference: Starter
) -> None:
    """A replica started before any model (no bucket yet) serves the first version put there, with
    no announcement and a poll too slow to matter: the KV watch is the path across hosts."""
    _app, inference = await start_inference(model_store=None, poll_interval_s=3600.0)
    local = ModelStore(tmp_path / "elsewhere")
    write_model(local, "v000001")
    bucket = await ModelBucket.open(nats_client.jetstream())
    await bucket.put_version(local.open_verified("v000001"))
    await bucket.set_live("v000001")
    await wait_serving(inference, "v000001")


async def test_a_replica_started_while_the_store_is_out_of_reach_waits_for_it(
    tmp_path: Path, feature: Any
) -> None:
    """A JetStream cluster whose node holding the models is down (or, after a heal, electing): a
    starting replica waits for the store instead of exiting, then serves the live version."""
    nodes = cluster_nodes(tmp_path / "cluster")
    for node in nodes:
        node.start()
    started: list[Any] = []
    nc = await connect(NatsSettings(url=",".join(n.url for n in nodes)), name="test")
    try:
        js = nc.jetstream()
        bucket = await ModelBucket.open(js)
        local = ModelStore(tmp_path / "elsewhere")
        write_model(local, "v000001")
        await bucket.put_version(local.open_verified("v000001"))
        await bucket.set_live("v000001")
        leader = (await js.stream_info(f"OBJ_{MODELS_BUCKET}")).cluster.leader  # type: ignore[union-attr]
        holder = next(n for i, n in enumerate(nodes) if f"n{i}" == leader)
        holder.stop()

        others = SimpleNamespace(url=",".join(n.url for n in nodes if n is not holder))
        settings = service_settings(
            InferenceSettings,
            others,
            tmp_path,
            feature_addr=f"127.0.0.1:{feature.port}",
            model_store=None,
            poll_interval_s=3600.0,
        )
        app = InferenceApp(settings)
        starting = asyncio.create_task(app.start())
        started.append(app)
        await asyncio.sleep(8)
        assert not starting.done(), "inference finished starting (or gave up) without the model store"

        holder.start()
        await asyncio.wait_for(starting, 60)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        try:
            await wait_serving(inference_pb2_grpc.InferenceServiceStub(channel), "v000001")
        finally:
            await channel.close()
    finally:
        for app in started:
            await app.stop()
        await nc.close()
        for node in nodes:
            node.stop()
