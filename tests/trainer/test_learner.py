"""The learner: prequential scoring then learning, content transfer, filters, expiry, checkpoints."""

from __future__ import annotations

import io

import numpy as np
import torch

from freshrec.v1 import event_pb2
from services.trainer.checkpoint import restore, to_bytes
from services.trainer.evaluation import Paired
from services.trainer.learner import Learner
from services.trainer.versions import make_shadow, rebase, snapshot
from tests.factories import event
from tests.trainer.streams import T0, catalogue_item, small_learner, taste_stream


def feed(learner: Learner, stream: list, size: int = 64) -> None:  # type: ignore[type-arg]
    for start in range(0, len(stream), size):
        learner.learn(stream[start : start + size])


def test_learns_a_pattern_scoring_each_event_before_learning_it() -> None:
    learner = small_learner(recent_window=200)
    stream = taste_stream(rounds=30)
    feed(learner, stream)
    figures = learner.prequential.as_metrics()
    assert learner.position.events_learned == len(stream)
    assert learner.position.stream_sequence == len(stream)
    assert figures["prequential_evaluated"] == len(stream)
    # Each user's next item follows its last one on a ring: once learned, nearly always in the
    # top 10 of the 120 items (random: about 10/100 late in the stream).
    assert figures["prequential_hr@10_recent"] > 0.8
    assert figures["prequential_hr@10"] > 0.4
    # A redelivery of what it already holds changes nothing.
    assert learner.learn(stream[:64]) == 0
    assert learner.prequential.evaluated == len(stream)


def test_frozen_weights_still_follow_fresh_histories() -> None:
    learner = small_learner()
    stream = taste_stream(rounds=30)
    feed(learner, stream[:800])
    weights = {k: v.clone() for k, v in learner.model.state_dict().items()}
    for start in range(800, len(stream), 64):
        learner.observe(stream[start : start + 64])  # scored, folded in, not learned
    assert all(torch.equal(v, learner.model.state_dict()[k]) for k, v in weights.items())
    assert learner.position.stream_sequence == len(stream)
    assert list(learner.histories["u0"])[-1][0] == learner.items.get(stream[-40][1].item_id)


def test_checkpoints_keep_the_position_names_they_were_first_written_with() -> None:
    """A checkpoint written before the code said "catalogue" loads, and one written now loads in
    that older code: the stored name stays ``catalog_sequence``."""
    learner = small_learner()
    feed(learner, taste_stream(rounds=2)[:50])
    learner.position.catalogue_sequence = 17
    doc = torch.load(io.BytesIO(to_bytes(learner)), weights_only=False)
    assert doc["position"]["catalog_sequence"] == 17 and "catalogue_sequence" not in doc["position"]
    restored = small_learner(seed=3)
    restore(restored, to_bytes(learner))
    assert restored.position == learner.position


def test_a_restored_checkpoint_continues_exactly_like_the_original() -> None:
    stream = taste_stream(rounds=12)
    a = small_learner()
    feed(a, stream[:200])
    b = small_learner(seed=7)
    restore(b, to_bytes(a))
    feed(a, stream[200:])
    b.learn(stream[150:264])  # a redelivery overlapping what the checkpoint holds
    feed(b, stream[264:])
    assert a.position == b.position
    assert a.prequential.as_metrics() == b.prequential.as_metrics()
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), name
    for name, value in a.optimizer.state_dict()["state"].items():
        assert torch.equal(value["exp_avg"], b.optimizer.state_dict()["state"][name]["exp_avg"])


def test_content_places_an_untouched_item_near_items_like_it() -> None:
    learner = small_learner(id_dropout=0.5, model_max_history=5)
    catalogue = [catalogue_item(f"x{i}", ["drama"], ["slow"]) for i in range(10)]
    catalogue += [catalogue_item(f"y{i}", ["action"], ["fast"]) for i in range(10)]
    catalogue += [catalogue_item("x-new", ["drama"], ["slow"]), catalogue_item("y-new", ["action"], ["fast"])]
    learner.add_items(list(enumerate(catalogue, start=1)))
    stream, seq = [], 1
    rng = np.random.default_rng(0)
    for _ in range(25):
        for u in range(20):
            kind = "x" if u % 2 == 0 else "y"
            stream.append((seq, event(f"u{u}", f"{kind}{rng.integers(10)}", at=T0 + seq)))
            seq += 1
    feed(learner, stream, 50)
    assert learner.item_counts[learner.items.get("x-new")] == 0
    vectors = learner.user_vectors(["u0", "u1"])
    table = learner.item_table()
    x_new, y_new = learner.items.get("x-new"), learner.items.get("y-new")
    scores = vectors @ table.T
    assert scores[0, x_new] > scores[0, y_new]  # a drama watcher gets the new drama first
    assert scores[1, y_new] > scores[1, x_new]
    # Untouched: the id embedding is off, the vector is its content alone.
    content = learner.model.content_vectors(
        learner.model.item_categories[[x_new]], learner.model.item_tags[[x_new]]
    )
    assert torch.allclose(table[x_new], content[0], atol=1e-6)


def test_a_dislike_is_remembered_as_seen_but_never_learned() -> None:
    learner = small_learner()
    learner.learn(
        [(1, event("u1", "a", at=T0)), (2, event("u1", "b", at=T0 + 1, type=event_pb2.EVENT_TYPE_DISLIKE))]
    )
    row_b = learner.items.get("b")
    assert row_b and row_b in learner.seen["u1"]
    assert [e[0] for e in learner.histories["u1"]] == [learner.items.get("a")]
    assert learner.item_counts[row_b] == 0


def test_frequency_filters_hold_back_id_embeddings_of_rare_ids() -> None:
    learner = small_learner(min_item_count=3, min_user_count=2)
    events = [(n, event("u1", "a", at=T0 + 100 * n)) for n in range(1, 4)]  # beyond the repeat window
    learner.learn(events[:1])
    assert learner.model.item_learned[learner.items.get("a")] == 0  # content only so far
    assert learner.users.get("u1") == 0  # the sequence tower alone speaks for the user
    learner.learn(events[1:2])
    assert learner.users.get("u1") != 0
    assert learner.model.item_learned[learner.items.get("a")] == 0
    learner.learn(events[2:])
    assert learner.model.item_learned[learner.items.get("a")] == 1


def test_rows_unseen_for_the_ttl_expire_and_are_reused() -> None:
    learner = small_learner(row_ttl_s=100.0)
    feed(learner, [(n, event(f"old{n % 3}", f"i{n % 4}", at=T0 + n)) for n in range(1, 13)])
    old_rows = {learner.items.get(f"i{k}") for k in range(4)}
    learner.learn([(20, event("new", "fresh", at=T0 + 1000))])
    assert learner.expire() == (4, 3)
    assert all(learner.items.get(f"i{k}") == 0 for k in range(4))
    assert "old0" not in learner.histories and learner.users.get("old0") == 0
    assert not np.isin(learner.replay.targets[: learner.replay.size], list(old_rows)).any()
    learner.learn([(21, event("new", "another", at=T0 + 1001))])
    assert learner.items.get("another") in old_rows  # a freed row, reset, handed out again
    assert learner.items.capacity_needed == 6  # no growth: 4 freed, 2 in use


def test_sampled_softmax_learns_when_the_catalogue_is_large() -> None:
    learner = small_learner(full_softmax_max_items=5, sampled_negatives=16, recent_window=200)
    feed(learner, taste_stream(rounds=30))
    assert learner.prequential.as_metrics()["prequential_hr@10_recent"] > 0.6


def test_shadows_compare_the_learner_with_a_version_on_the_same_events() -> None:
    learner = small_learner()
    stream = taste_stream(rounds=30)
    feed(learner, stream[:800])
    learner.shadows = {"live": make_shadow(learner, "v1", snapshot(learner))}
    learner.gate = Paired()
    with torch.no_grad():  # sabotage: the learner forgets what it knew
        for p in learner.model.parameters():
            p.add_(torch.randn_like(p) * 2.0)
    learner.observe(stream[800:1000])
    assert learner.gate.n > 0 and learner.gate.mean_a < learner.gate.mean_b
    assert learner.gate.worse(0.02, 50)
    rebase(learner, snapshot_of(learner, "live"))
    learner.gate = Paired()
    learner.observe(stream[1000:])
    assert not learner.gate.worse(0.0, 10)  # continuing from the version's weights: no worse


def snapshot_of(learner: Learner, role: str) -> dict:  # type: ignore[type-arg]
    shadow = learner.shadows[role]
    weights = snapshot(learner)
    weights["model"] = {k: v.clone() for k, v in shadow.model.state_dict().items()}
    return weights


def test_served_weights_are_a_moving_average_and_new_items_serve_their_trained_rows() -> None:
    learner = small_learner(average_decay=0.9, average_min_count=3, online_momentum=0.0)
    stream = taste_stream(rounds=8)
    feed(learner, stream[:256])
    assert learner.trained is not learner.model
    name = "blocks.0.qkv.weight"
    served = learner.model.state_dict()[name].clone()
    fresh = [(257, event("u0", "brand-new", at=T0 + 257, event_id="e257"))]
    learner.learn(stream[256:300] + fresh)
    trained = learner.trained.state_dict()[name]
    assert not torch.equal(learner.model.state_dict()[name], trained)
    assert torch.allclose(learner.model.state_dict()[name], 0.9 * served + 0.1 * trained, atol=1e-6)
    # An item with fewer than average_min_count interactions serves its trained id embedding as
    # it is; an established one serves the average.
    new_row = learner.items.get("brand-new")
    old_row = learner.items.get(stream[0][1].item_id)
    assert learner.item_counts[new_row] == 1 and learner.item_counts[old_row] >= 3
    assert torch.equal(learner.model.item_ids.weight[new_row], learner.trained.item_ids.weight[new_row])
    assert not torch.equal(learner.model.item_ids.weight[old_row], learner.trained.item_ids.weight[old_row])
    # The exported and scored weights are the served ones; a fit ends with both the same.
    learner.fit(learner.sequence_chunks(learner.log_sequences(stream[:300])), 1)
    assert torch.equal(learner.model.state_dict()[name], learner.trained.state_dict()[name])


def test_a_restored_checkpoint_with_averaged_weights_continues_exactly() -> None:
    stream = taste_stream(rounds=12)
    a = small_learner(average_decay=0.9, online_momentum=0.0)
    feed(a, stream[:192])
    b = small_learner(average_decay=0.9, online_momentum=0.0, seed=7)
    restore(b, to_bytes(a))
    feed(a, stream[192:])
    feed(b, stream[192:])
    assert a.prequential.as_metrics() == b.prequential.as_metrics()
    for mine, theirs in ((a.model, b.model), (a.trained, b.trained)):
        for name, tensor in mine.state_dict().items():
            assert torch.equal(tensor, theirs.state_dict()[name]), name


def test_replayed_windows_keep_their_events_weights_scaled_by_the_replay_weight() -> None:
    learner = small_learner(model_max_history=10, replay_weight=0.5)
    kinds = [event_pb2.EVENT_TYPE_VIEW, event_pb2.EVENT_TYPE_PURCHASE]  # weights 1 and 5
    batch = [
        (k + 1, event("u0", f"i{k}", type=kinds[k % 2], at=T0 + 60 * k, event_id=f"e{k}")) for k in range(4)
    ]
    learner.learn(batch)
    assert learner.replay.size == 0  # fewer than half a window of new items: not offered yet
    more = [
        (k + 1, event("u0", f"i{k}", type=kinds[k % 2], at=T0 + 60 * k, event_id=f"e{k}"))
        for k in range(4, 7)
    ]
    learner.learn(more)
    # One chunk, each of the 7 items a target with its own weight (the first predicted from nothing).
    assert learner.replay.size == 1
    weights = learner.replay.weights[0][learner.replay.targets[0] > 0]
    assert weights.tolist() == [1.0, 5.0, 1.0, 5.0, 1.0, 5.0, 1.0]
    replayed = learner._replayed(7, 1.0)
    assert replayed is not None
    assert sorted(set(replayed.weights[replayed.targets > 0].tolist())) == [0.5, 2.5]
