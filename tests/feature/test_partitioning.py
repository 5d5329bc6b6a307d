"""Two replicas split the users between them by subject filter: each applies exactly its
share, nothing twice, and both agree with one process reading everything."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from freshrec.v1 import feature_pb2
from services.feature.state import FeatureState
from shared.nats import user_partition
from tests.feature.helpers import (
    accepted_times,
    caught_up,
    publish,
    settings_for,
    started,
    stored_state,
    stub,
    workload,
)


def canonical(dump: dict) -> str:
    return json.dumps(dump, sort_keys=True)


async def test_two_replicas_split_the_stream_with_nothing_applied_twice(
    nats_server, nats_client, tmp_path: Path
) -> None:
    # Both replicas share one database: their rows are keyed by replica.
    replicas = [
        settings_for(nats_server, tmp_path, "shared", partition={"replicas": 2, "replica": r}) for r in (0, 1)
    ]
    events = workload(3000, users=60, seed=11)
    owner = [user_partition(e.user_id) % 2 for e in events]
    assert 0 < sum(owner) < len(owner)

    apps = [await started(s) for s in replicas]
    await publish(nats_client, events[:1500])
    await apps[1].stop()  # one replica restarts half way
    await publish(nats_client, events[1500:])
    apps[1] = await started(replicas[1])

    for r, app in enumerate(apps):
        last = max(seq for seq, o in enumerate(owner, 1) if o == r)
        await caught_up(app, last)
    states = [app.state for app in apps]
    accepted = await accepted_times(nats_client, [e.event_id for e in events])
    assert states[0] is not None and states[1] is not None
    # Each replica holds exactly its users, and equals a single pass over its share of the stream.
    for r, state in enumerate(states):
        assert state is not None
        assert {user_partition(u) % 2 for u in state.users} == {r}
        expected = FeatureState(replicas[r].recent_items, replicas[r].preprocessing, replicas[r].popularity)
        for seq, (e, o, at) in enumerate(zip(events, owner, accepted, strict=True), 1):
            if o == r:
                expected.apply(e, seq, at)
        assert canonical(state.dump()) == canonical(expected.dump())
    # Together they applied every event once: the same per-user counts and preprocessing state
    # as one process reading the whole stream (as the trainer does).
    whole = FeatureState(50)
    for seq, e in enumerate(events, 1):
        whole.apply(e, seq)
    split = {u: (s.user_doc(u)["counts"], s.user_doc(u)["pre"]) for s in states if s for u in s.users}
    assert split == {u: (whole.user_doc(u)["counts"], whole.user_doc(u)["pre"]) for u in whole.users}

    # Asking the wrong replica is an error that names the right one.
    user = next(e.user_id for e, o in zip(events, owner, strict=True) if o == 1)
    channel, feature = stub(apps[0])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await feature.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id=user))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "replica 1 of 2" in (caught.value.details() or "")
    mine = next(e.user_id for e, o in zip(events, owner, strict=True) if o == 0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await feature.BatchGetUserFeatures(feature_pb2.BatchGetUserFeaturesRequest(user_ids=[mine, user]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"user {user!r}" in (caught.value.details() or "")
    await channel.close()
    channel, feature = stub(apps[1])
    answer = await feature.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id=user))
    assert answer.features.known
    await channel.close()

    for app in apps:
        await app.stop()
    for r, state in enumerate(states):
        assert state is not None
        assert canonical(stored_state(replicas[r])) == canonical(state.dump())
