"""Each request is answered by the ranker that wins for users like its user: the trainer measures
the model and popularity per segment of history length, names the winners in the export, and
inference follows them (real learner, real export, real inference service and feature service)."""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np

from freshrec.v1 import inference_pb2
from services.trainer.export import POPULARITY, export_learner
from services.trainer.policy import FOLLOW_UP, MODEL
from shared.model_store import ModelStore
from tests.conftest import eventually
from tests.factories import event
from tests.inference.conftest import Starter, announce, publish_events, recent_items, wait_serving
from tests.trainer.streams import T0, small_learner


def two_worlds(n: int, seed: int = 0) -> list[tuple[int, Any]]:
    """Regulars with a taste (each walks the items of their group in order: the model learns it)
    and a stream of newcomers who each take the hot item of the moment, which changes every 40
    events to one never seen before: only a popularity with a short memory knows it."""
    rng = random.Random(seed)
    groups = {0: [f"a{i}" for i in range(200)], 1: [f"b{i}" for i in range(200)]}
    walked: dict[str, int] = {}
    out = []
    for seq in range(1, n + 1):
        if rng.random() < 0.4:
            user, item = f"newcomer{seq}", f"hot{seq // 40}"
        else:
            u = rng.randrange(30)
            user = f"regular{u}"
            step = walked[user] = walked.get(user, rng.randrange(50)) + 1
            item = groups[u % 2][step % 200]
        out.append((seq, event(user, item, at=T0 + seq, event_id=f"e{seq}")))
    return out


def trained() -> Any:
    learner = small_learner(recent_window=600)
    learner.policy.min_events = 100
    stream = two_worlds(6_000)
    for start in range(0, len(stream), 50):
        learner.learn(stream[start : start + 50])
    return learner, stream


async def test_newcomers_get_the_hot_items_and_regulars_what_knows_their_walk(
    start_inference: Starter, store: ModelStore, nats_client: Any, feature: Any
) -> None:
    learner, stream = trained()
    choice = learner.policy.choice()
    figures = learner.policy.figures()
    # Newcomers: popularity with a short memory; regulars: a ranker that knows their walk (the
    # model or the follow-ups), each the best of its segment's figures.
    assert choice["new"].startswith("popular:") and choice["long"] in (MODEL, FOLLOW_UP), figures
    for segment in ("new", "long"):
        mine = figures[f"policy_{segment}_{choice[segment]}_hr@10"]
        assert mine == max(v for k, v in figures.items() if k.startswith(f"policy_{segment}_"))
    assert figures[f"policy_new_{choice['new']}_hr@10"] > figures["policy_new_model_hr@10"]
    assert figures[f"policy_long_{choice['long']}_hr@10"] > figures["policy_long_popular:1000_hr@10"]

    exported = export_learner(learner, parent_version=None)
    assert exported.manifest["serving"]["policy"] == choice
    stored = store.write_version("v000001", exported.files, exported.manifest)
    columns = np.load(io.BytesIO(exported.files[POPULARITY]))
    assert columns.shape == (exported.manifest["model"]["item_rows"], 3) and not columns[0].any()
    # The regulars' histories, as the feature service would hold them.
    await publish_events(nats_client, [e for _, e in stream if e.user_id.startswith("regular")])
    _app, stub = await start_inference()
    await announce(nats_client, store, "v000001", stored.manifest["sha256"])
    await wait_serving(stub, "v000001")

    hot_now = f"hot{(len(stream) - 1) // 40}"
    newcomer = await stub.Recommend(inference_pb2.RecommendRequest(user_id="someone-new", k=10))
    assert {i.source for i in newcomer.items} == {inference_pb2.RECOMMENDATION_SOURCE_POPULAR}
    assert hot_now in [i.item_id for i in newcomer.items[:3]]
    assert all("popular over the last" in i.reason for i in newcomer.items)

    last = [e.item_id for _, e in stream if e.user_id == "regular0"][-1]

    async def history_applied() -> bool:
        return (await recent_items(feature.port, "regular0"))[:1] == [last]

    await eventually(history_applied, what="regular0's history in the feature service")
    regular = await stub.Recommend(inference_pb2.RecommendRequest(user_id="regular0", k=10))
    expected = {
        MODEL: inference_pb2.RECOMMENDATION_SOURCE_MODEL,
        FOLLOW_UP: inference_pb2.RECOMMENDATION_SOURCE_FOLLOW_UP,
    }[choice["long"]]
    assert regular.items[0].source == expected
    following = f"a{(int(last[1:]) + 1) % 200}"  # the next item of regular0's walk
    assert following in [i.item_id for i in regular.items]
