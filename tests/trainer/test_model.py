"""The model's building blocks: growing tables keep optimizer state, exact chunk windows, tied ranks."""

from __future__ import annotations

import math

import numpy as np
import torch

from services.trainer.evaluation import Paired, rank_metrics
from services.trainer.model import IdMap, ModelConfig, TwoTower
from services.trainer.replay import ChunkBuilder


def test_tables_grow_and_the_optimizer_keeps_its_moments() -> None:
    model = TwoTower(ModelConfig(dim=8, max_history=5), item_capacity=4, user_capacity=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    history = torch.tensor([[0, 0, 1, 2, 3]])
    model.item_learned[:4] = 1
    for _ in range(3):
        loss = model(history, torch.tensor([1])).sum() + model.item_vectors(4).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    old = model.item_ids.weight
    moments = {k: v.clone() for k, v in optimizer.state[old].items()}
    before = old.detach().clone()

    assert model.ensure_capacity(optimizer, items=9, users=2)
    new = model.item_ids.weight
    assert new.shape[0] == 16 and new is not old
    assert torch.equal(new[:4].detach(), before)
    state = optimizer.state[new]
    assert torch.equal(state["step"], moments["step"])
    assert torch.equal(state["exp_avg"][:4], moments["exp_avg"]) and not state["exp_avg"][4:].any()
    assert torch.equal(state["exp_avg_sq"][:4], moments["exp_avg_sq"])
    assert any(p is new for group in optimizer.param_groups for p in group["params"])
    assert model.item_learned.shape[0] == 16 and model.item_categories.shape[0] == 16
    # Training continues on the grown table, new rows included.
    model.item_learned[:9] = 1
    loss = model(torch.tensor([[0, 5, 6, 7, 8]]), torch.tensor([1])).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert not torch.equal(model.item_ids.weight[5].detach(), new[5].detach() * 0)


def test_id_maps_reuse_freed_rows_without_collisions() -> None:
    ids = IdMap()
    assert [ids.add(x, t) for t, x in enumerate("abc")] == [1, 2, 3]
    assert ids.add("a", 10.0) == 1 and ids.last_seen[1] == 10.0
    assert ids.unseen_since(5.0) == ["b", "c"]
    assert ids.remove("b") == 2
    assert ids.get("b") == 0 and ids.ids[2] == ""
    assert ids.add("d") == 2  # the freed row, not a fourth one
    assert len(ids) == 3 and ids.capacity_needed == 4
    restored = IdMap.from_state(ids.state())
    assert restored.rows == ids.rows and restored.free == ids.free


def test_a_chunk_predicts_each_target_from_exactly_its_served_window() -> None:
    torch.manual_seed(0)
    length = 4
    model = TwoTower(ModelConfig(dim=8, max_history=length, dropout=0.0), item_capacity=32).eval()
    model.item_learned[:] = 1
    seq = [(r, 1, ()) for r in (3, 7, 5, 9, 11, 4, 6, 8, 10)]
    builder = ChunkBuilder(length, 0)
    builder.add(seq, 2, [1.0] * 7, 0)  # targets seq[2:], some chunks span more than L items
    chunks = builder.build()
    table = model.item_vectors(32)
    with torch.no_grad():
        out = model.encode(
            table, torch.from_numpy(chunks.inputs), torch.zeros(len(chunks), dtype=torch.long), None
        )
        for c, positions in enumerate(builder.positions):
            off = builder.offset(c, chunks.inputs.shape[1])
            for pos, t in positions:
                window = [e[0] for e in seq[max(0, t - length) : t]]
                served = torch.tensor([[0] * (length - len(window)) + window])
                expected = model(served, torch.tensor([0]))[0]
                assert torch.allclose(out[c, off + pos], expected, atol=1e-5), (c, pos, t)
                assert chunks.targets[c, off + pos] == seq[t][0]


def test_ties_count_at_their_expected_rank() -> None:
    n = 50
    constant = torch.zeros((3, n))
    hr, ndcg = rank_metrics(constant, torch.tensor([0, 7, 49]))
    assert torch.allclose(hr, torch.full((3,), 10 / n, dtype=torch.float64))
    expected_ndcg = sum(1 / math.log2(r + 2) for r in range(10)) / n
    assert torch.allclose(ndcg, torch.full((3,), expected_ndcg, dtype=torch.float64))

    scores = torch.tensor([[5.0, 4.0, 4.0, 3.0, -math.inf]])
    hr, ndcg = rank_metrics(scores, torch.tensor([1]), k=2)  # ranks 1 or 2, equally likely
    assert hr.item() == 0.5
    assert abs(ndcg.item() - 0.5 / math.log2(3)) < 1e-12
    hr, _ = rank_metrics(scores, torch.tensor([4]), k=10)  # an excluded target is a miss
    assert hr.item() == 0.0
    hr, _ = rank_metrics(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))
    assert hr.item() == 0.0


def test_a_paired_comparison_needs_evidence_beyond_noise() -> None:
    worse = Paired()
    rng = np.random.default_rng(0)
    a = torch.from_numpy((rng.random(400) < 0.1).astype(np.float64))
    b = torch.from_numpy((rng.random(400) < 0.3).astype(np.float64))
    worse.add(a, b)
    assert worse.worse(0.02, 100)
    assert not worse.worse(0.02, 1000)  # too few events to decide
    same = Paired()
    same.add(b, b)
    assert not same.worse(0.0, 10)


def test_training_and_exported_content_means_agree_in_value_and_gradient() -> None:
    torch.manual_seed(0)
    model = TwoTower(ModelConfig(dim=8, max_history=4), item_capacity=8)
    categories = torch.tensor([[1, 2, 0], [0, 0, 0], [3, 0, 0], [2, 2, 5]])
    tags = torch.tensor([[4, 0], [7, 9], [0, 0], [1, 0]])
    results = []
    for exportable in (False, True):
        model.zero_grad()
        vectors = model.content_vectors(categories, tags, exportable=exportable)
        (vectors * torch.arange(8.0)).sum().backward()
        assert model.categories.weight.grad is not None and model.tags.weight.grad is not None
        results.append(
            (vectors.detach(), model.categories.weight.grad.clone(), model.tags.weight.grad.clone())
        )
    for fast, plain in zip(results[0], results[1], strict=True):
        assert torch.allclose(fast, plain, atol=1e-6)
    assert results[0][0][2].abs().sum() > 0  # an item with a category and no tag still has a vector


def test_asking_for_the_last_positions_only_gives_the_same_vectors_and_gradients() -> None:
    torch.manual_seed(0)
    config = ModelConfig(dim=8, max_history=6, blocks=3, heads=2, dropout=0.0, max_context=2)
    model = TwoTower(config, item_capacity=32).eval()
    model.item_learned[:] = 1
    history = torch.randint(1, 32, (3, 12))
    history[0, :5] = 0  # left padding
    context = torch.randint(0, 4, (3, 12, 2))
    users = torch.tensor([1, 2, 3])
    weights = torch.arange(8.0)
    results = []
    for outputs in (None, 4):
        model.zero_grad()
        h = model.encode(model.item_vectors(32), history, users, None, context, outputs)
        assert h.shape == ((3, 12, 8) if outputs is None else (3, 4, 8))
        (h[:, -4:] * weights).sum().backward()
        assert model.item_ids.weight.grad is not None
        results.append((h[:, -4:].detach(), model.item_ids.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-4)  # sums in another order
    with torch.no_grad():
        last = model.encode(model.item_vectors(32), history, users, None, context, 1)
    assert torch.allclose(last[:, 0], results[0][0][:, -1], atol=1e-5)
