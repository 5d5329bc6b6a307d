"""What was shown: each Recommend and SimilarItems answer carries a recommendation_id and its list
is published on freshrec.recommendations.served (FRESHREC_SERVED), off the request path; a NATS
that cannot take the lists costs the request nothing and is counted."""

from __future__ import annotations

import re
from typing import Any

import nats

from freshrec.v1 import inference_pb2
from services.inference.served import SERVED, ServedPublisher, ServedSettings, erase_users_lists
from shared.nats import SERVED_STREAM
from tests.conftest import eventually
from tests.inference.artifacts import catalogue_items, write
from tests.inference.conftest import publish_items, wait_serving


async def stored_lists(nc: Any) -> list[inference_pb2.ServedList]:
    js = nc.jetstream()
    info = await js.stream_info(SERVED_STREAM)
    lists = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(SERVED_STREAM, seq)
        except nats.js.errors.NotFoundError:
            continue  # erased
        served = inference_pb2.ServedList()
        served.ParseFromString(msg.data or b"")
        lists.append(served)
    return lists


def outcome(name: str) -> float:
    return float(SERVED.labels(name)._value.get())


async def test_every_answer_is_named_and_its_list_published(start_inference, store, nats_client) -> None:
    write(store, "v000001", item_tower=True)
    store.set_live("v000001")
    await publish_items(nats_client, catalogue_items())
    app, stub = await start_inference(replica_name="inference-7")
    await wait_serving(stub, "v000001")

    async def catalogue_known() -> bool:
        return app.holder.state is not None and app.holder.state.catalogue_version >= 120

    await eventually(catalogue_known, what="the catalogue in the serving state")
    first = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=5, context={"page": "home"}))
    again = await stub.Recommend(inference_pb2.RecommendRequest(user_id="u1", k=5))
    similar = await stub.SimilarItems(inference_pb2.SimilarItemsRequest(item_id="beta-3", k=4))
    ids = [first.recommendation_id, again.recommendation_id, similar.recommendation_id]
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 3

    lists = await eventually(
        lambda: _when_all(stored_lists(nats_client), 3), what="three lists on FRESHREC_SERVED"
    )
    by_id = {served.recommendation_id: served for served in lists}
    shown = by_id[first.recommendation_id]
    assert shown.rpc == "Recommend" and shown.user_id == "u1" and dict(shown.context) == {"page": "home"}
    assert shown.model_version == "v000001" and shown.replica == "inference-7"
    assert [(i.item_id, i.position, i.source) for i in shown.items] == [
        (i.item_id, n, i.source) for n, i in enumerate(first.items)
    ]
    assert shown.served_at.seconds > 0
    anchored = by_id[similar.recommendation_id]
    assert anchored.rpc == "SimilarItems" and anchored.anchor_item_id == "beta-3" and not anchored.user_id
    assert [i.item_id for i in anchored.items] == [i.item_id for i in similar.items]

    # Forgetting u1 erases both of u1's lists and keeps the one served to nobody in particular.
    assert await erase_users_lists(nats_client, "u1") == 2
    left = await stored_lists(nats_client)
    assert [served.recommendation_id for served in left] == [similar.recommendation_id]


async def _when_all(lists: Any, count: int) -> Any:
    found = await lists
    return found if len(found) >= count else None


async def test_lists_nats_cannot_take_are_counted_not_queued_without_end(nats_server) -> None:
    """No FRESHREC_SERVED stream: JetStream has no one to store the lists (as when NATS is away)."""
    nc = await nats.connect(nats_server.url)
    try:
        publisher = ServedPublisher(nc.jetstream(), ServedSettings(queue=3, batch=2, ack_timeout_s=0.5), "r")
        request = inference_pb2.RecommendRequest(user_id="u1", k=2)
        answer = inference_pb2.RecommendResponse(recommendation_id="ab" * 16, model_version="v000001")
        answer.items.add(item_id="i1", score=0.5)
        failed, dropped = outcome("failed"), outcome("dropped")
        for _ in range(5):
            publisher.offer(request, answer)  # never blocks: the queue holds 3, the rest are dropped
        assert outcome("dropped") == dropped + 2 and len(publisher.pending) == 3
        published = outcome("published")
        for _ in range(2):
            await publisher._publish_batch()
        assert outcome("failed") == failed + 3 and outcome("published") == published
        assert not publisher.pending
    finally:
        await nc.close()
