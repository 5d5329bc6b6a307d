"""The leadership lease and the state bucket on a real nats-server: one holder at a time, a lapsed
or released lease taken over, a deposed leader refused, and the checkpoint mirrored so that a
trainer elsewhere restores it (older generations and removed weights erased from the stream)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from services.trainer.leadership import Lease, LostLease
from services.trainer.registry import CheckpointFile
from services.trainer.state_bucket import StateBucket
from tests.conftest import eventually


async def test_one_holder_at_a_time_and_a_release_hands_over_at_once(nats_client: Any) -> None:
    js = nats_client.jetstream()
    a = await Lease.open(js, "trainer-a", "host-a:1", ttl_s=30)
    b = await Lease.open(js, "trainer-b", "host-b:2", ttl_s=30)
    assert await a.try_acquire() and a.leading
    assert not await b.try_acquire() and not b.leading
    holder = await b.holder()
    assert holder is not None and (holder.name, holder.address) == ("trainer-a", "host-a:1")
    await a.renew()
    await a.release()
    assert await b.try_acquire()  # no waiting for the TTL
    assert (await a.holder()).name == "trainer-b"  # type: ignore[union-attr]
    with pytest.raises(LostLease):
        await a.renew()


async def test_a_lapsed_lease_is_taken_and_the_old_leader_is_deposed(nats_client: Any) -> None:
    js = nats_client.jetstream()
    a = await Lease.open(js, "trainer-a", "a", ttl_s=1)
    b = await Lease.open(js, "trainer-b", "b", ttl_s=1)
    assert await a.try_acquire()
    # a stops renewing (paused, cut off): after the TTL the key expires and b takes it.
    await eventually(b.try_acquire, timeout_s=10, interval_s=0.1, what="the lapsed lease taken")
    with pytest.raises(LostLease):
        await a.renew()  # a wakes up: it must not go on as a leader
    assert not a.leading
    await asyncio.wait_for(b.renew(), 5)


async def test_a_trainer_restarted_under_its_name_takes_its_lease_back(nats_client: Any) -> None:
    js = nats_client.jetstream()
    before = await Lease.open(js, "trainer-a", "a", ttl_s=30)
    assert await before.try_acquire()
    after = await Lease.open(js, "trainer-a", "a", ttl_s=30)  # the same trainer, after a crash
    assert await after.try_acquire()
    with pytest.raises(LostLease):
        await before.renew()


async def test_the_checkpoint_folder_travels_through_the_state_bucket(
    nats_client: Any, tmp_path: Path
) -> None:
    js = nats_client.jetstream()
    state = await StateBucket.open(js)
    leader, elsewhere = tmp_path / "leader", tmp_path / "elsewhere"
    assert not await state.restore_into(elsewhere)  # nothing yet: the folder is left alone

    checkpoint, weights = CheckpointFile(leader), CheckpointFile(leader / "versions")
    checkpoint.save(b"first checkpoint holding user-secret-1 " * 5000)
    weights.save_as("v000001.pt", b"weights one")
    await state.mirror(leader)
    checkpoint.save(b"second checkpoint " * 5000)
    weights.save_as("v000002.pt", b"weights two")
    (leader / "versions" / "v000001.pt").unlink()  # withdrawn
    await state.mirror(leader)

    CheckpointFile(elsewhere / "versions").save_as("v000007.pt", b"stale")
    assert await state.restore_into(elsewhere)
    assert CheckpointFile(elsewhere).load() == b"second checkpoint " * 5000
    assert sorted(p.name for p in (elsewhere / "versions").iterdir()) == ["v000002.pt"]
    # The replaced checkpoint and the removed weights are erased from the stream's files.
    await nats_client.flush()
    for secret in (b"user-secret-1", b"weights one"):
        assert not [p for p in (tmp_path / "nats").rglob("*") if p.is_file() and secret in p.read_bytes()]


async def test_renewals_at_once_do_not_depose_the_leader(nats_client: Any) -> None:
    """The loop renews before it publishes while the keeper renews on its clock: concurrently."""
    lease = await Lease.open(nats_client.jetstream(), "trainer-a", "a", ttl_s=30)
    assert await lease.try_acquire()
    await asyncio.gather(*(lease.renew() for _ in range(8)))
    assert lease.leading and (await lease.holder()).revision == lease.revision  # type: ignore[union-attr]
