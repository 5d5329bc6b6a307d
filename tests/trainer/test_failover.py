"""Two trainers on one stream with no shared folder: one leads through the KV lease, the other
stands by (answers reads, refuses writes naming the leader), and when the leader is SIGKILLed the
standby takes over from the checkpoint in the Object Store and reaches exactly the figures of a
trainer that never stopped: nothing learned twice, nothing skipped."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import grpc
import pytest

from freshrec.v1 import trainer_pb2, trainer_pb2_grpc
from shared.model_bucket import ModelBucket
from tests.conftest import eventually
from tests.feature.helpers import publish
from tests.harness import free_port
from tests.trainer.streams import taste_stream
from tests.trainer.test_durability import (
    learned_through,
    matches_a_trainer_that_never_stopped,
    start_trainer,
    status,
)

pytestmark = pytest.mark.slow


def start_member(nats_url: str, folder: Path, shared: Path, name: str, port: int) -> subprocess.Popen[bytes]:
    """A trainer of the group: its own checkpoint folder, the group's database, no model folder."""
    folder.mkdir()
    return start_trainer(
        nats_url,
        folder,
        "trainer",
        port,
        FRESHREC_MODEL_STORE=None,
        FRESHREC_DATABASE__URL=f"sqlite:///{shared / 'trainer.db'}",
        FRESHREC_REPLICA_NAME=name,
        FRESHREC_LEASE_TTL_S="2",
    )


async def role_of(port: int) -> int:
    return int((await status(port)).role)


async def test_the_standby_takes_over_from_a_killed_leader_and_learns_every_event_once(
    nats_server, nats_client, tmp_path: Path
) -> None:
    stream = taste_stream(n_users=40, rounds=20)
    n = len(stream)
    await publish(nats_client, [e for _, e in stream[:500]])
    a_port, b_port = free_port(), free_port()
    leader = start_member(nats_server.url, tmp_path / "a", tmp_path, "trainer-a", a_port)
    standby: subprocess.Popen[bytes] | None = None
    try:
        await eventually(
            lambda: _is(role_of(a_port), trainer_pb2.TRAINER_ROLE_LEADER), timeout_s=60, what="a leads"
        )
        await learned_through(a_port, 500)  # checkpoints (with exports) at 200 and 400
        standby = start_member(nats_server.url, tmp_path / "b", tmp_path, "trainer-b", b_port)
        waiting = await status(b_port)
        assert waiting.role == trainer_pb2.TRAINER_ROLE_STANDBY and waiting.leader.startswith("trainer-a")
        assert waiting.live_version  # reads answer from the shared registry
        async with grpc.aio.insecure_channel(f"127.0.0.1:{b_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await trainer_pb2_grpc.TrainerServiceStub(channel).TriggerTraining(
                    trainer_pb2.TriggerTrainingRequest()
                )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "trainer-a" in refused.value.details()

        leader.send_signal(signal.SIGKILL)  # no release: the standby waits out the lease's TTL
        leader.wait(30)
        await publish(nats_client, [e for _, e in stream[500:]])
        await eventually(
            lambda: _is(role_of(b_port), trainer_pb2.TRAINER_ROLE_LEADER), timeout_s=60, what="b leads"
        )
        got = await learned_through(b_port, n)
        assert got.leader.startswith("trainer-b")
        # B's exports went to the bucket and its registry, as A's did: the pointer names the live one
        # (compared at one moment: B keeps exporting).
        bucket = await ModelBucket.open(nats_client.jetstream())

        async def pointer_follows() -> bool:
            return await bucket.live_version() == (await status(b_port)).live_version

        await eventually(pointer_follows, timeout_s=30, what="the bucket's pointer naming the live version")
    finally:
        for process in (leader, standby):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(30)

    # A trainer that never stopped, on the same stream from its own consumer and folders.
    await matches_a_trainer_that_never_stopped(got, nats_server.url, tmp_path / "steady", n)


async def _is(value, expected: int) -> bool:  # type: ignore[no-untyped-def]
    return await value == expected
