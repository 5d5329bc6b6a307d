"""Hot reload on real parts: swaps under concurrent load fail no request; pinning and rollback
through the real trainer reach every replica; the poll catches a missed announcement; health
says NOT_SERVING only with neither a model nor a fallback."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from freshrec.v1 import inference_pb2, trainer_pb2, trainer_pb2_grpc
from services.inference.server import InferenceApp
from services.inference.settings import InferenceSettings
from services.trainer.server import TrainerApp
from services.trainer.settings import TrainerSettings
from tests.conftest import eventually, service_settings
from tests.inference.artifacts import write
from tests.inference.conftest import (
    NOT_SERVING,
    SERVING,
    announce,
    health_status,
    publish_events,
    wait_serving,
)
from tests.trainer.streams import taste_stream


async def test_reloads_under_concurrent_load_fail_no_request(start_inference, store, nats_client) -> None:
    versions = [f"v{n:06d}" for n in range(1, 9)]
    digests = {v: write(store, v, seed=n) for n, v in enumerate(versions)}
    store.set_live(versions[0])
    app, stub = await start_inference(keep_versions=3)
    await wait_serving(stub, versions[0])

    stop = asyncio.Event()
    served: Counter[str] = Counter()
    failures: list[str] = []

    async def client(n: int) -> None:
        user = f"u{n}"
        while not stop.is_set():
            try:
                if n % 3 == 0:
                    r = await stub.ScoreItems(
                        inference_pb2.ScoreItemsRequest(user_id=user, item_ids=["alpha-1"])
                    )
                    assert len(r.scores) == 1
                elif n % 3 == 1:
                    r = await stub.SimilarItems(inference_pb2.SimilarItemsRequest(item_id="beta-2", k=5))
                    assert len(r.items) == 5
                else:
                    r = await stub.Recommend(
                        inference_pb2.RecommendRequest(user_id=user, k=10, diversity=0.3)
                    )
                    assert len(r.items) == 10
                served[r.model_version] += 1
            except Exception as exc:  # every failure is a defect: collect them all
                failures.append(repr(exc))

    clients = [asyncio.create_task(client(n)) for n in range(9)]
    try:
        for version in versions[1:]:
            await announce(nats_client, store, version, digests[version])
            await wait_serving(stub, version)
            before = sum(served.values())
            await eventually(lambda b=before: _more(served, b), what="requests on the new version")
        # A rollback to a version still loaded is instant; one evicted is loaded again.
        await announce(nats_client, store, versions[-2], digests[versions[-2]], reason="rolled_back")
        await wait_serving(stub, versions[-2])
        await announce(nats_client, store, versions[0], digests[versions[0]], reason="rolled_back")
        await wait_serving(stub, versions[0])
        before = sum(served.values())
        await eventually(lambda: _more(served, before), what="requests after the rollbacks")
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert failures == []
    assert set(served) == set(versions), served
    info = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
    assert len(info.loaded_versions) == 3 and info.loaded_versions[0] == versions[0]


async def _more(served: Counter[str], before: int) -> bool:
    return sum(served.values()) >= before + 20


async def test_a_request_finishes_on_the_model_it_started_with(start_inference, store, nats_client) -> None:
    write(store, "v000001")
    store.set_live("v000001")
    app, stub = await start_inference()
    await wait_serving(stub, "v000001")
    held = app.holder.state  # what an in-flight request holds
    sha = write(store, "v000002", seed=7)
    await announce(nats_client, store, "v000002", sha)
    await wait_serving(stub, "v000002")
    # The old state is intact and usable after the swap.
    vector = held.model.user_vectors([[("alpha-1", 2)]], ["u1"])[0]
    rows, scores = held.retrieve(vector, 5, held.positions(["alpha-1"]))
    assert len(rows) == 5 and held.model.version == "v000001"
    assert app.holder.state.model.version == "v000002"


async def test_poll_catches_a_missed_announcement(start_inference, store) -> None:
    write(store, "v000001")
    store.set_live("v000001")
    _app, stub = await start_inference(poll_interval_s=0.1)
    await wait_serving(stub, "v000001")
    write(store, "v000002", seed=3)
    store.set_live("v000002")  # no announcement at all
    await wait_serving(stub, "v000002")


async def test_health_is_not_serving_only_without_model_and_fallback(
    nats_server, tmp_path: Path, nats_client
) -> None:
    from shared.model_store import ModelStore

    store = ModelStore(tmp_path / "models")
    app = InferenceApp(
        service_settings(
            InferenceSettings,
            nats_server,
            tmp_path,
            feature_addr="127.0.0.1:1",  # nothing listens there: no popularity fallback
            health_interval_s=0.1,
        )
    )
    await app.start()
    try:
        assert await health_status(app.port) == NOT_SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            from freshrec.v1 import inference_pb2_grpc

            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1"))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            sha = write(store, "v000001")
            store.set_live("v000001")
            await announce(nats_client, store, "v000001", sha)

            async def serving() -> bool:
                return await health_status(app.port) == SERVING

            await eventually(serving, what="SERVING once a model is loaded")
            # The feature service is still unreachable: answers come from the model, users look new.
            response = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=3))
            assert len(response.items) == 3 and response.model_version == "v000001"
    finally:
        await app.stop()


@pytest.mark.slow
async def test_promote_and_rollback_through_the_trainer_reach_every_replica(
    nats_server, tmp_path: Path, nats_client, start_inference, store
) -> None:
    from tests.factories import event

    trainer = TrainerApp(
        service_settings(
            TrainerSettings, nats_server, tmp_path, dim=8, max_history=10, export_interval_s=3600
        )
    )
    await trainer.start()
    try:
        events = [e for _, e in taste_stream(n_users=10, rounds=4)]
        for n, e in enumerate(events):
            e.event_id = f"t{n}"
        await publish_events(nats_client, events)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{trainer.port}")
        train = trainer_pb2_grpc.TrainerServiceStub(channel)

        async def learned() -> bool:
            status = await train.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())
            return status.events_learned >= len(events)

        await eventually(learned, timeout_s=60, what="the trainer to learn the events")
        first = (await train.TriggerTraining(trainer_pb2.TriggerTrainingRequest())).model.version
        await publish_events(nats_client, [event("u1", "a7", event_id="later")])
        await eventually(
            lambda: _learned_more(train, len(events)), timeout_s=60, what="the trainer to learn one more"
        )
        second = (await train.TriggerTraining(trainer_pb2.TriggerTrainingRequest())).model.version
        assert second != first

        replicas = [await start_inference(), await start_inference()]
        await train.PromoteModel(trainer_pb2.PromoteModelRequest(version=second))  # pin
        for _app, stub in replicas:
            await wait_serving(stub, second)
        await train.RollbackModel(trainer_pb2.RollbackModelRequest(version=first))
        for app, stub in replicas:
            await wait_serving(stub, first)
            response = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=3))
            assert response.model_version == first
            assert app.holder.failed == {}
        await channel.close()
    finally:
        await trainer.stop()


async def _learned_more(train: Any, n: int) -> bool:
    status = await train.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())
    return bool(status.events_learned > n)
