"""Offline accuracy on MovieLens-100K: protocols A (temporal leave-last-one-out) and C (cold items).

A: each user's events sorted by (time, item) -- and, separately, by time with a seeded random
order inside each second. The last event is the test item, the one before it validation, the
rest training. Every model ranks all 1,682 items for each of the 943 users, excluding the
user's training items (and at test time the validation item, after retraining on train +
validation). Hyper-parameters (freshrec's epochs, item-kNN's k, EASE's lambda, BPR's epochs) are
chosen on validation only. Baselines: popularity, item-kNN (cosine), EASE, BPR-MF.

C: 10 % of the items (numpy default_rng(0)) lose every interaction from training; the model
knows them only from the catalogue (u.item: genres, release year, title). For each user with
an interaction with one of them, the earliest such is the test item and the history is the
user's other interactions before it; only the cold items are ranked. Baselines: random and
genre overlap. freshrec is run without and with the `text` extra (sentence-encoded titles).

freshrec is the trainer's own code with the service's default settings: ``Learner`` from
``TrainerSettings().learner_config``, catalogue through ``add_items``, history through the
shared preprocessing (``absorb_events``), epochs through ``fit``, user vectors as exported.

    .venv/bin/python bench/accuracy.py            # the full run (tens of minutes on 2 cores)
    .venv/bin/python bench/accuracy.py --quick    # a smoke run: few epochs, a sample of users

Prints a table, then one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from recsys import data  # noqa: E402
from recsys.baselines import BPR, EASE, ItemKNN, Popularity, interaction_matrix, pairs  # noqa: E402
from recsys.metrics import finite_everywhere, rank  # noqa: E402

from services.trainer import datasets  # noqa: E402
from services.trainer.learner import Learner  # noqa: E402
from services.trainer.settings import TrainerSettings  # noqa: E402
from services.trainer.text import TEXT_DIM, TextEncoder, text_extra_installed  # noqa: E402

Figures = dict[str, float]


def mean(per_user: dict[str, np.ndarray]) -> Figures:
    return {k: float(v.mean()) for k, v in per_user.items()}


# -- freshrec -------------------------------------------------------------------------------------
class Freshrec:
    """The trainer's learner on MovieLens ids, with the catalogue as content."""

    def __init__(self, text: np.ndarray | None, seed: int, **overrides: Any) -> None:
        settings = TrainerSettings(text_features="on" if text is not None else "off", seed=seed, **overrides)
        self.learner = Learner(settings.learner_config(TEXT_DIM if text is not None else 0))
        self.settings = settings
        items = datasets.read_items(data.ML100K / "u.item")
        self.learner.add_items([(0, item) for item in items], text)

    def absorb(self, sequences: dict[int, list[tuple[int, int]]]) -> Any:
        events = []
        for user, seq in sequences.items():
            for item, t in seq:
                events.append((0, datasets.to_event(datasets.Rating(str(user), str(item), 4.0, float(t)))))
        return self.learner.absorb_events(events)

    def fit(self, sequences: Any, epochs: int, every: int = 0, on_epoch: Any = None) -> None:
        chunks = self.learner.sequence_chunks(sequences, context=self.settings.pretrain_context)

        def progress(epoch: int, total: int, loss: float) -> None:
            if on_epoch is not None and every and epoch % every == 0:
                on_epoch(epoch)

        self.learner.fit(chunks, epochs, progress=progress)

    def scores(self, users: list[int], n_items: int) -> np.ndarray:
        """[users, n_items + 1] scores in MovieLens item ids (column 0 unused)."""
        learner = self.learner
        with torch.no_grad():
            rows = learner.user_vectors([str(u) for u in users]) @ learner.item_table().T
        columns = np.array([learner.items.get(str(i)) for i in range(n_items + 1)])
        out = rows.numpy().astype(np.float64)[:, columns]
        out[:, 0] = 0.0
        return out


def title_vectors(quick: bool) -> np.ndarray | None:
    if not text_extra_installed():
        return None
    items = datasets.read_items(data.ML100K / "u.item")
    return TextEncoder().encode([datasets.item_text(i) for i in items])


# -- protocol A -----------------------------------------------------------------------------------
def protocol_a(order: str, quick: bool, max_epochs: int, every: int, seed: int) -> dict[str, Any]:
    r = data.load()
    sequences = data.user_sequences(r, order, seed)
    users = sorted(sequences)
    if quick:
        users = users[:100]
        sequences = {u: sequences[u] for u in users}
    n_items = r.n_items
    train = {u: [i for i, _ in s[:-2]] for u, s in sequences.items()}
    train_val = {u: [i for i, _ in s[:-1]] for u, s in sequences.items()}
    val_target = np.array([sequences[u][-2][0] for u in users])
    test_target = np.array([sequences[u][-1][0] for u in users])
    ua = np.array(users)
    results: dict[str, Any] = {}
    chosen: dict[str, Any] = {}

    def evaluate(scores: np.ndarray, targets: np.ndarray, history: dict[int, list[int]]) -> Figures:
        assert finite_everywhere(scores), "a model gave an item a non-finite score"
        return mean(rank(scores, targets, [np.array(history[u]) for u in users]))

    x_train = interaction_matrix(train, r.n_users, n_items)
    x_test = interaction_matrix(train_val, r.n_users, n_items)

    # popularity: nothing to tune
    results["popularity"] = evaluate(Popularity().fit(x_test).scores(ua, x_test), test_target, train_val)

    # item-kNN: k on validation
    best = max(
        (20, 50, 100, 200),
        key=lambda k: evaluate(ItemKNN(k).fit(x_train).scores(ua, x_train), val_target, train)["ndcg@10"],
    )
    chosen["item_knn_k"] = best
    results["item_knn"] = evaluate(ItemKNN(best).fit(x_test).scores(ua, x_test), test_target, train_val)

    # EASE: lambda on validation
    best_lam = max(
        (100.0, 250.0, 500.0, 1000.0),
        key=lambda lam: evaluate(EASE(lam).fit(x_train).scores(ua, x_train), val_target, train)["ndcg@10"],
    )
    chosen["ease_lambda"] = best_lam
    results["ease"] = evaluate(EASE(best_lam).fit(x_test).scores(ua, x_test), test_target, train_val)

    # BPR-MF: epochs on validation
    bpr_epochs = 5 if quick else 75
    model = BPR(r.n_users, n_items, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pu, pi = pairs(train)
    curve = []
    for epoch in range(1, bpr_epochs + 1):
        model.step(pu, pi, optimizer)
        if epoch % 5 == 0:
            curve.append((evaluate(model.scores(ua), val_target, train)["ndcg@10"], epoch))
    best_epochs = max(curve)[1]
    chosen["bpr_epochs"] = best_epochs
    model = BPR(r.n_users, n_items, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pu, pi = pairs(train_val)
    for _ in range(best_epochs):
        model.step(pu, pi, optimizer)
    results["bpr_mf"] = evaluate(model.scores(ua), test_target, train_val)

    # freshrec: epochs on validation, then retrained on train + validation
    started = time.perf_counter()
    fresh = Freshrec(None, seed)
    held = fresh.absorb({u: s[:-2] for u, s in sequences.items()})
    val_curve: list[tuple[float, int]] = []

    def on_epoch(epoch: int) -> None:
        figures = evaluate(fresh.scores(users, n_items), val_target, train)
        val_curve.append((figures["ndcg@10"], epoch))
        print(
            f"  freshrec {order}: epoch {epoch} validation HR@10 {figures['hr@10']:.4f} "
            f"NDCG@10 {figures['ndcg@10']:.4f}",
            file=sys.stderr,
            flush=True,
        )

    fresh.fit(held, max_epochs, every, on_epoch)
    best_val, epochs = max(val_curve)
    chosen["freshrec_epochs"] = epochs
    chosen["freshrec_validation_ndcg@10"] = best_val
    fresh = Freshrec(None, seed)
    fresh.fit(fresh.absorb({u: s[:-1] for u, s in sequences.items()}), epochs)
    results["freshrec"] = evaluate(fresh.scores(users, n_items), test_target, train_val)
    chosen["freshrec_seconds"] = time.perf_counter() - started
    return {
        "users": len(users),
        "results": results,
        "chosen": chosen,
        "validation_curve": [[e, v] for v, e in sorted(val_curve, key=lambda p: p[1])],
    }


# -- protocol C -----------------------------------------------------------------------------------
def protocol_c(quick: bool, epochs: int, seed: int, text: np.ndarray | None) -> dict[str, Any]:
    r = data.load()
    n_items = r.n_items
    rng = np.random.default_rng(0)
    cold = np.sort(rng.choice(np.arange(1, n_items + 1), size=n_items // 10, replace=False))
    is_cold = np.zeros(n_items + 1, dtype=bool)
    is_cold[cold] = True
    sequences = data.user_sequences(r, "sorted")
    warm = {u: [(i, t) for i, t in s if not is_cold[i]] for u, s in sequences.items()}
    tests: list[tuple[int, int, list[int]]] = []  # user, cold test item, history before it
    for u, s in sequences.items():
        first = next((k for k, (i, _) in enumerate(s) if is_cold[i]), None)
        if first is not None:
            tests.append((u, s[first][0], [i for i, _ in s[:first]]))
    if quick:
        tests = tests[:60]
        warm = {u: warm[u] for u, _, _ in tests}
    users = [u for u, _, _ in tests]
    targets = np.array([i for _, i, _ in tests])
    not_cold = [np.flatnonzero(~is_cold) for _ in tests]  # rank the cold items only

    results: dict[str, Any] = {"random": {"hr@10": 10 / len(cold), "ndcg@10": float("nan")}}
    genres = data.read_genres()
    overlap = np.zeros((len(tests), n_items + 1))
    for row, (_, _, history) in enumerate(tests):
        profile = genres[history].sum(0) if history else np.zeros(genres.shape[1])
        overlap[row] = genres @ profile
    results["genre_overlap"] = mean(rank(overlap, targets, not_cold, ks=(10,)))
    # The random figure by the same counting rules (a constant scorer, ties at expected rank).
    results["random"] = mean(rank(np.zeros_like(overlap), targets, not_cold, ks=(10,)))

    variants = [("freshrec", None)]
    if text is not None:
        variants.append(("freshrec_text", text))
    for name, vectors in variants:
        fresh = Freshrec(vectors, seed)
        fresh.fit(fresh.absorb(warm), epochs)
        learner = fresh.learner
        # Each test user's history is the interactions before the cold item.
        for u, _, history in tests:
            rows = [(learner.items.get(str(i)), 5, ()) for i in history if not is_cold[i]]
            learner.histories[str(u)] = deque(rows[-learner.max_history :], maxlen=learner.max_history)
        scores = fresh.scores(users, n_items)
        assert np.isfinite(scores[:, cold]).all()
        results[name] = mean(rank(scores, targets, not_cold, ks=(10,)))
        results[name]["cold_items_learned"] = float(
            learner.item_counts[[learner.items.get(str(i)) for i in cold]].sum()
        )
    return {"users": len(tests), "cold_items": int(len(cold)), "results": results}


# -- the report -----------------------------------------------------------------------------------
REFERENCE = {
    "sorted": {"sasrec": {"hr@10": 0.2068, "ndcg@10": 0.1105, "hr@20": 0.3054, "ndcg@20": 0.1354}},
    "random": {"sasrec": {"hr@10": 0.2110, "ndcg@10": 0.1192}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few epochs, a sample of users")
    parser.add_argument("--max-epochs", type=int, default=60, help="freshrec epochs tried on validation (A)")
    parser.add_argument("--every", type=int, default=5, help="validate freshrec every this many epochs")
    parser.add_argument("--cold-epochs", type=int, default=30, help="freshrec epochs for protocol C")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    if args.quick:
        args.max_epochs, args.every, args.cold_epochs = 1, 1, 1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tempfile.tempdir = tempfile.mkdtemp(prefix="freshrec-bench-accuracy-")
    started = time.perf_counter()

    report: dict[str, Any] = {"protocol_a": {}, "protocol_c": {}}
    for order in ("sorted", "random"):
        report["protocol_a"][order] = protocol_a(order, args.quick, args.max_epochs, args.every, args.seed)
    text = title_vectors(args.quick)
    report["protocol_c"] = protocol_c(args.quick, args.cold_epochs, args.seed, text)

    print("\nProtocol A: MovieLens-100K, temporal leave-last-one-out, full ranking (test split)")
    ratios: dict[str, float] = {}
    for order, a in report["protocol_a"].items():
        print(f"\n  order inside a second: {order} ({a['users']} users); chosen on validation: {a['chosen']}")
        print(f"  {'model':<14}{'HR@10':>9}{'NDCG@10':>9}{'HR@20':>9}{'NDCG@20':>9}")
        for name, f in a["results"].items():
            print(f"  {name:<14}{f['hr@10']:>9.4f}{f['ndcg@10']:>9.4f}{f['hr@20']:>9.4f}{f['ndcg@20']:>9.4f}")
        ref = REFERENCE[order]["sasrec"]
        print(f"  {'SASRec (ref.)':<14}{ref['hr@10']:>9.4f}{ref['ndcg@10']:>9.4f}")
        baselines = {k: v for k, v in a["results"].items() if k != "freshrec"}
        best_hr = max(v["hr@10"] for v in baselines.values())
        best_ndcg = max(v["ndcg@10"] for v in baselines.values())
        f = a["results"]["freshrec"]
        ratios[f"a_{order}_hr@10_vs_best_baseline"] = f["hr@10"] / best_hr
        ratios[f"a_{order}_ndcg@10_vs_best_baseline"] = f["ndcg@10"] / best_ndcg
        ratios[f"a_{order}_hr@10_vs_sasrec"] = f["hr@10"] / ref["hr@10"]
        ratios[f"a_{order}_ndcg@10_vs_sasrec"] = f["ndcg@10"] / ref["ndcg@10"]

    c = report["protocol_c"]
    print(
        f"\nProtocol C: cold items ({c['cold_items']} items never trained on, {c['users']} users), "
        "HR@10 / NDCG@10"
    )
    for name, f in c["results"].items():
        print(f"  {name:<16}{f['hr@10']:>9.4f}{f['ndcg@10']:>9.4f}")
    cr = c["results"]
    for name in ("freshrec", "freshrec_text"):
        if name in cr:
            ratios[f"c_{name}_hr@10_vs_random"] = cr[name]["hr@10"] / cr["random"]["hr@10"]
            ratios[f"c_{name}_hr@10_vs_genre_overlap"] = cr[name]["hr@10"] / cr["genre_overlap"]["hr@10"]
    print("\nRatios:", json.dumps({k: round(v, 3) for k, v in ratios.items()}))
    report["ratios"] = ratios
    report["quick"] = args.quick
    report["seconds"] = time.perf_counter() - started
    report["text_extra"] = text is not None
    report["series"] = {
        f"freshrec_validation_ndcg@10_{order}": a["validation_curve"]
        for order, a in report["protocol_a"].items()
    }
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
