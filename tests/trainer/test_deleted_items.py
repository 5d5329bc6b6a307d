"""A deleted catalogue item leaves the model: DeleteItems on a real feature service, its tombstone
on FRESHREC_CATALOG, the trainer following it, and the next export (ONNX + side files) without
the item. A hidden item stays in the model (it may come back) and is only kept out of answers."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from freshrec.v1 import feature_pb2, feature_pb2_grpc
from services.feature.server import FeatureApp
from services.feature.settings import FeatureSettings
from tests.conftest import eventually, service_settings
from tests.feature.helpers import publish
from tests.trainer.streams import catalogue_item, taste_stream
from tests.trainer.test_service import QUIET, trainer  # noqa: F401  (the fixture)


def _array(path: Path) -> np.ndarray:
    return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)


async def test_a_deleted_item_is_not_in_the_next_export(
    trainer,  # noqa: F811  (the fixture imported above)
    nats_server,
    nats_client,
    tmp_path,
) -> None:
    feature = FeatureApp(service_settings(FeatureSettings, nats_server, tmp_path))
    await feature.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{feature.port}")
    stub: Any = feature_pb2_grpc.FeatureServiceStub(channel)
    try:
        items = [catalogue_item(f"a{n}", ["drama"]) for n in range(20)]
        await stub.UpsertItems(feature_pb2.UpsertItemsRequest(items=items))
        stream = taste_stream(n_users=6, rounds=2)  # u0 takes a0 then a1: popularity and a follow-up
        await publish(nats_client, [e for _, e in stream])
        t = await trainer(**QUIET)
        await t.learned(len(stream))
        loop: Any = t.app.loop

        async def catalogued(n: int) -> bool:
            return bool(loop.learner.position.catalogue_sequence >= n)

        await eventually(lambda: catalogued(20), what="the catalogue followed")
        before = t.store.open_verified((await t.export()).version).path
        assert {"a0", "a1", "a14"} <= set(json.loads((before / "item_ids.json").read_text()))

        hidden = catalogue_item("a14", ["drama"])
        hidden.hidden = True
        await stub.UpsertItems(feature_pb2.UpsertItemsRequest(items=[hidden]))
        deleted = await stub.DeleteItems(feature_pb2.DeleteItemsRequest(item_ids=["a0", "a1"]))
        assert deleted.deleted == 2
        await eventually(lambda: catalogued(23), what="the tombstones followed")

        after = t.store.open_verified((await t.export()).version).path
        item_ids = json.loads((after / "item_ids.json").read_text())
        assert "a0" not in item_ids and "a1" not in item_ids and "a14" in item_ids
        n = len(item_ids)
        assert _array(after / "item_embeddings.npy").shape[0] == n
        assert _array(after / "popularity.npy").shape[0] == n
        follow_ups = _array(after / "follow_up_items.npy")
        assert follow_ups.shape[0] == n and int(follow_ups.max()) < n
    finally:
        await channel.close()
        await feature.stop()


def test_events_of_a_deleted_item_are_dropped_until_it_is_upserted_again(tmp_path: Path) -> None:
    from services.trainer import checkpoint
    from tests.trainer.streams import small_learner

    learner = small_learner()
    learner.add_items([(1, catalogue_item("gone", ["drama"])), (2, catalogue_item("kept", ["drama"]))])
    tombstone = catalogue_item("gone", [])
    tombstone.deleted = True
    learner.add_items([(3, tombstone)])
    assert "gone" not in learner.items.rows and "kept" in learner.items.rows
    late = [(seq, e) for seq, e in taste_stream(n_users=4, rounds=2, start_seq=10)]
    for n, (_, e) in enumerate(late):
        e.item_id = "gone" if n % 2 else "kept"
    learner.learn(late)
    learner.absorb_events(late)
    assert "gone" not in learner.items.rows  # late or replayed events do not bring it back

    restored = small_learner()
    checkpoint.restore(restored, checkpoint.to_bytes(learner))
    assert restored.deleted_items == {"gone"}
    restored.add_items([(4, catalogue_item("gone", ["drama"]))])  # upserted again: a new item
    assert "gone" in restored.items.rows and not restored.deleted_items
