"""Inference's user lookups follow the feature replicas' partition map: through a scale-out from
one replica to two, each lookup goes to the owner of the user's partition, the old replica answers
until the new ones have caught up, and once it is stopped every lookup is still fresh and its
channel is closed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc

from services.feature.server import FeatureApp
from services.feature.settings import FeatureSettings
from services.inference.features import FeatureClient, FeatureRouter
from shared.feature_replicas import open_bucket
from shared.nats import EVENT_PARTITIONS, user_partition
from tests.conftest import eventually, service_settings
from tests.inference.conftest import publish_events
from tests.trainer.streams import taste_stream


async def start_feature(nats_server: Any, folder: Path, **partition: int) -> FeatureApp:
    app = FeatureApp(service_settings(FeatureSettings, nats_server, folder, partition=partition or {}))
    await app.start()
    return app


async def test_lookups_move_to_new_owners_once_they_have_caught_up(
    nats_server: Any, nats_client: Any, tmp_path: Path
) -> None:
    stream = taste_stream(n_users=16, rounds=3)
    await publish_events(nats_client, [e for _, e in stream])
    users = sorted({e.user_id for _, e in stream})
    assert {user_partition(u) % 2 for u in users} == {0, 1}
    old = await start_feature(nats_server, tmp_path / "old")
    started = [old]
    default = grpc.aio.insecure_channel(f"127.0.0.1:{old.port}")
    router = FeatureRouter(default, grpc.aio.insecure_channel)
    client = FeatureClient(default, deadline_s=2.0, router=router)
    follow = asyncio.create_task(router.follow(await open_bucket(nats_client.jetstream())))
    old_address = f"127.0.0.1:{old.port}"
    try:
        await eventually(
            lambda: _true(
                len(router.map.owner) == EVENT_PARTITIONS and router.map.entries["feature"].caught_up
            ),
            what="the single replica owning every partition",
        )
        assert {router.map.address_for(u) for u in users} == {old_address}
        before = {u: (await client.user(u)).recent_items for u in users}
        assert all(len(items) == 3 for items in before.values())

        new = [
            await start_feature(nats_server, tmp_path / f"new-{i}", replica=i, replicas=2) for i in range(2)
        ]
        started += new
        addresses = {i: f"127.0.0.1:{app.port}" for i, app in enumerate(new)}

        async def moved() -> bool:
            return all(router.map.address_for(u) == addresses[user_partition(u) % 2] for u in users)

        await eventually(moved, timeout_s=30, what="lookups routed to the caught-up new replicas")
        assert router.map.revision >= 2
        await old.stop()
        started.remove(old)
        after = {}
        for u in users:
            view = await client.user(u)
            assert view.fresh, u  # answered by its owner, not from the cache
            after[u] = view.recent_items
        assert after == before
        # The old replica owns nothing now: its channel is closed, the new owners' are kept.
        assert set(router.stubs) == set(router.channels) == set(addresses.values())
    finally:
        follow.cancel()
        await router.close()
        await default.close()
        for app in started:
            await app.stop()


async def _true(value: bool) -> bool:
    return value
