"""The done-criterion of forgetting a user: on the embedded stack (real processes, nats-server,
SQLite, gRPC, onnxruntime) under live load, `freshrec forget` completes, and afterwards not one
byte of anything the stack persisted (SQLite files, the JetStream store, trainer checkpoints and
snapshots, the model store, the services' logs at INFO) holds the user id."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import grpc
import nats
import pytest

from cli.stack import Stack, wait_healthy
from freshrec.v1 import (
    event_pb2,
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from shared.nats import RAW_SUBJECT
from tests.conftest import eventually
from tests.factories import event

pytestmark = pytest.mark.slow

#: Distinctive enough that finding these bytes anywhere means a trace of the user.
TARGET = "zq-forget-me-7f3a91"
LOAD_USERS = [f"load-{u}" for u in range(20)]
ITEMS = [f"item-{i}" for i in range(40)]


@pytest.fixture
def stack(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Stack(
        tmp_path / "var",
        ports={"nats": 0, "ingestion": 0, "feature": 0, "trainer": 0, "inference": 0},
        extra_env={
            "ingestion": {"FRESHREC_FORGET__SETTLE_S": "2"},
            "trainer": {"FRESHREC_EXPORT_INTERVAL_S": "1", "FRESHREC_MICRO_BATCH": "32"},
            "inference": {"FRESHREC_POLL_INTERVAL_S": "2"},
        },
        log_dir=tmp_path / "logs",
    )
    s.start()
    yield s
    s.stop()


async def live_load(address: str, nats_url: str, stop: asyncio.Event) -> int:
    """About 200 events/s of other users over gRPC and NATS until ``stop``; returns how many."""
    sent = 0
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        n = 0
        while not stop.is_set():
            batch = [
                event(
                    LOAD_USERS[(n + k) % len(LOAD_USERS)],
                    ITEMS[(n * 7 + k) % len(ITEMS)],
                    event_id=f"load-{n}-{k}",
                )
                for k in range(20)
            ]
            await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=batch[:15]))
            for e in batch[15:]:
                await js.publish(RAW_SUBJECT, e.SerializeToString())
            sent += len(batch)
            n += 1
            await asyncio.sleep(0.1)
    await nc.close()
    return sent


def versions_holding(models: Path, user: str) -> list[str]:
    out = []
    for path in sorted((models / "versions").glob("*/user_ids.json")):
        if user in json.loads(path.read_text()):
            out.append(path.parent.name)
    return out


async def test_forget_under_live_load_leaves_no_byte_of_the_user(stack: Stack, tmp_path: Path) -> None:
    ingestion_address = stack.address("ingestion")
    stop = asyncio.Event()
    load = asyncio.create_task(live_load(ingestion_address, stack.nats.url, stop))
    nc = await nats.connect(stack.nats.url)
    js = nc.jetstream()
    infer_channel = grpc.aio.insecure_channel(stack.address("inference"))
    infer = inference_pb2_grpc.InferenceServiceStub(infer_channel)
    try:
        # The user: events over gRPC (ids holding the user id), over NATS (protobuf and JSON), and
        # an invalid one that lands in the dead-letter stream.
        async with grpc.aio.insecure_channel(ingestion_address) as channel:
            stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
            mine = [
                event(TARGET, ITEMS[i % 8], event_id=f"{TARGET}-{i}", at=time.time() - 100 + i)
                for i in range(30)
            ]
            assert (await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=mine))).accepted == 30
        await js.publish(RAW_SUBJECT, event(TARGET, ITEMS[9], event_id=f"{TARGET}-raw").SerializeToString())
        await js.publish(
            RAW_SUBJECT,
            json.dumps(
                {
                    "eventId": f"{TARGET}-json",
                    "userId": TARGET,
                    "itemId": ITEMS[10],
                    "type": "EVENT_TYPE_VIEW",
                    "occurredAt": "2026-11-30T10:00:00Z",
                }
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        bad = event(TARGET, ITEMS[11], event_id=f"{TARGET}-bad", type=event_pb2.EVENT_TYPE_UNSPECIFIED)
        await js.publish(RAW_SUBJECT, bad.SerializeToString())

        models = tmp_path / "var" / "models"

        async def held_by_two_versions() -> bool:
            return len(versions_holding(models, TARGET)) >= 2

        await eventually(held_by_two_versions, timeout_s=120, what="two model versions that hold the user")

        async def recommended() -> bool:
            answer = await infer.Recommend(inference_pb2.RecommendRequest(user_id=TARGET, k=5))
            return bool(answer.items)

        await eventually(recommended, timeout_s=30, what="a recommendation for the user (cached features)")
        holders = versions_holding(models, TARGET)

        # The operator's command, under load.
        command = [
            sys.executable,
            "-m",
            "cli",
            "--ingestion",
            ingestion_address,
            "forget",
            TARGET,
            "--timeout",
            "180",
        ]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )
        output, _ = await process.communicate()
        text = output.decode()
        assert process.returncode == 0, text
        assert "done in" in text
        for service in ("ingestion", "feature", "trainer", "inference"):
            assert f"{service}/" in text and "pending" not in text.splitlines()[-2], text

        assert versions_holding(models, TARGET) == []
        async with grpc.aio.insecure_channel(stack.address("trainer")) as channel:
            listed = await trainer_pb2_grpc.TrainerServiceStub(channel).ListModels(
                trainer_pb2.ListModelsRequest()
            )
            stored = {p.name for p in (models / "versions").iterdir()}
            assert {m.version for m in listed.models} <= stored  # the registry names no withdrawn version
            assert not stored & set(holders)
            for withdrawn in holders[-1:]:  # rollback cannot bring a withdrawn version back
                with pytest.raises(grpc.aio.AioRpcError):
                    await trainer_pb2_grpc.TrainerServiceStub(channel).RollbackModel(
                        trainer_pb2.RollbackModelRequest(version=withdrawn)
                    )
        info = await infer.GetModelInfo(inference_pb2.GetModelInfoRequest())
        assert info.model_version in stored

        # Late events of the user, while the load goes on: dropped by the tombstone.
        async with grpc.aio.insecure_channel(ingestion_address) as channel:
            late = await ingestion_pb2_grpc.IngestionServiceStub(channel).IngestEvents(
                ingestion_pb2.IngestEventsRequest(events=[event(TARGET, ITEMS[1], event_id=f"{TARGET}-late")])
            )
        assert (late.accepted, late.forgotten) == (0, 1)
        await js.publish(
            RAW_SUBJECT, event(TARGET, ITEMS[2], event_id=f"{TARGET}-late-raw").SerializeToString()
        )
        answer = await infer.Recommend(inference_pb2.RecommendRequest(user_id=TARGET, k=5))
        assert answer.model_version in stored
        # Give the intake the late raw message and let the load run on for a moment.
        await asyncio.sleep(3)
    finally:
        stop.set()
        sent = await load
        with contextlib.suppress(Exception):
            await nc.close()
        await infer_channel.close()
    assert sent > 0
    stack.stop()  # everything flushed and closed: what is on disk now is all there is

    needle = TARGET.encode()
    leaks = [
        str(path.relative_to(tmp_path))
        for path in sorted(tmp_path.rglob("*"))
        if path.is_file() and needle in path.read_bytes()
    ]
    assert leaks == [], f"the user id is still in: {leaks}"
    scanned = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in scanned) and any("jetstream" in str(p) for p in scanned)
    assert any(p.name == "checkpoint.pt" for p in scanned) and any(p.suffix == ".log" for p in scanned)


def kill(stack: Stack, name: str) -> None:
    process = stack.services[name].process
    assert process is not None
    process.kill()
    process.wait()


async def restart_dead(stack: Stack) -> None:
    """What ``freshrec up`` does for a service that died: start it again, then wait for SERVING."""
    for instance in stack.supervise_once():
        service = stack.services[instance]
        await asyncio.to_thread(wait_healthy, service.address, 120.0, service.process)


async def test_every_service_killed_mid_forget_still_leaves_no_byte(stack: Stack, tmp_path: Path) -> None:
    user = TARGET + "-killed"
    address = stack.address("ingestion")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        mine = [event(user, ITEMS[i % 8], event_id=f"{user}-{i}") for i in range(20)]
        others = [event(u, ITEMS[i], event_id=f"{u}-{i}") for u in LOAD_USERS[:5] for i in range(10)]
        await stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=mine + others))
    models = tmp_path / "var" / "models"

    async def held() -> bool:
        return bool(versions_holding(models, user))

    await eventually(held, timeout_s=120, what="a model version that holds the user")

    async with grpc.aio.insecure_channel(address) as channel:
        answer = await ingestion_pb2_grpc.IngestionServiceStub(channel).ForgetUser(
            ingestion_pb2.ForgetUserRequest(user_id=user)
        )
    # Mid-forget: ingestion (still waiting out its settle time) and the trainer die at once, then,
    # while those start again, the feature service and inference.
    for name in ("ingestion", "trainer"):
        kill(stack, name)
    await asyncio.to_thread(stack.supervise_once)
    for name in ("feature", "inference"):
        kill(stack, name)
    await restart_dead(stack)
    for name in ("ingestion", "trainer"):
        service = stack.services[name]
        await asyncio.to_thread(wait_healthy, service.address, 120.0, service.process)

    async def done() -> bool:
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                status = await ingestion_pb2_grpc.IngestionServiceStub(channel).GetForgetStatus(
                    ingestion_pb2.GetForgetStatusRequest(request_id=answer.request_id), timeout=5
                )
        except grpc.aio.AioRpcError:
            return False
        return status.done

    await eventually(done, timeout_s=240, interval_s=0.5, what="the forget request done after the kills")
    assert versions_holding(models, user) == []
    stack.stop()
    needle = user.encode()
    leaks = [
        str(p.relative_to(tmp_path))
        for p in sorted(tmp_path.rglob("*"))
        if p.is_file() and needle in p.read_bytes()
    ]
    assert leaks == [], f"the user id is still in: {leaks}"
