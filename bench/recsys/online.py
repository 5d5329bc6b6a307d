"""Baselines for the live protocol (``bench/live.py``), computed beside freshrec on the same stream.

The protocol: the first part of a stream warms every ranker up; then, batch by batch, each ranker
answers top-k for every event's user *before* the batch, leaving out what that user touched
earlier (as freshrec does), and a hit is the event's item in the answer; then the batch is learned.

- ``popularity``: all-time counts;
- ``decayed popularity``: counts decayed over *events* (half-lives of a few thousand to tens of
  thousands of events; the best of them is reported), so the stream's clock does not matter;
- ``transitions``: what followed the user's last item, backed off to decayed popularity;
- ``item-kNN``: cosine similarity of co-occurrence inside users' recent windows, updated online;
- ``SASRec``: the sequence model of Kang & McAuley (2 blocks, dim 64, length 50), trained on the
  warm-up only (epochs chosen on its own last tenth) and frozen; histories stay fresh.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

K = 10


@dataclass(frozen=True)
class Event:
    user: int
    item: int


def top_excluding(scores: np.ndarray, excluded: Sequence[int], k: int, rng: np.random.Generator) -> list[int]:
    """The k best-scoring items not excluded; ties broken at random (no lucky order)."""
    s = scores.astype(np.float64, copy=True)
    finite = np.isfinite(s)
    scale = float(np.abs(s[finite]).max()) if finite.any() else 0.0
    s[finite] += rng.random(int(finite.sum())) * 1e-9 * (scale + 1.0)
    if len(excluded):
        s[np.asarray(excluded, dtype=np.int64)] = -np.inf
    n = min(k, int(np.isfinite(s).sum()))
    if n <= 0:
        return []
    best = np.argpartition(-s, n - 1)[:n]
    return [int(i) for i in best[np.argsort(-s[best])]]


class Ranker:
    name = "ranker"

    def warm(self, events: Sequence[Event], histories: dict[int, list[int]]) -> None:
        """After the warm-up events went through ``update``: a ranker that fits does it here."""

    def recommend(self, user: int, history: list[int], seen: set[int], k: int) -> list[int]:
        raise NotImplementedError

    def update(self, events: Sequence[Event], histories: dict[int, list[int]]) -> None:
        """Learns a batch; ``histories`` already hold the batch's items."""


class Popularity(Ranker):
    name = "popularity"

    def __init__(self, n_items: int, seed: int = 0) -> None:
        self.counts = np.zeros(n_items)
        self.rng = np.random.default_rng(seed)
        self._order: np.ndarray | None = None

    def update(self, events: Sequence[Event], histories: dict[int, list[int]]) -> None:
        for e in events:
            self.counts[e.item] += 1.0
        self._order = None

    def scores(self) -> np.ndarray:
        return self.counts

    def recommend(self, user: int, history: list[int], seen: set[int], k: int) -> list[int]:
        if self._order is None:  # once per batch: the head of the ranking, ties at random
            s = self.scores() + self.rng.random(len(self.counts)) * 1e-12
            self._order = np.argsort(-s, kind="stable")
        out = []
        for i in self._order:
            if int(i) not in seen:
                out.append(int(i))
                if len(out) == k:
                    break
        return out


class DecayedPopularity(Popularity):
    """Each event counts 2^(-age / half_life), age in events since it arrived."""

    def __init__(self, n_items: int, half_life_events: float, seed: int = 0) -> None:
        super().__init__(n_items, seed)
        self.name = f"decayed popularity (half-life {half_life_events:,.0f} events)"
        self.rate = math.log(2.0) / half_life_events
        self.clock = 0  # events so far

    def update(self, events: Sequence[Event], histories: dict[int, list[int]]) -> None:
        for e in events:
            self.clock += 1
            self.counts[e.item] += math.exp(self.rate * self.clock)
        if self.rate * self.clock > 200:  # rescale before exp overflows; ranks do not change
            self.counts *= math.exp(-self.rate * self.clock)
            self.clock = 0
        self._order = None


class Transitions(Ranker):
    """Counts of item b following item a in a user's sequence; ranked by the user's last item, the
    rest of the list from decayed popularity."""

    name = "last-item transitions"

    def __init__(self, fallback: DecayedPopularity) -> None:
        self.next: dict[int, dict[int, float]] = defaultdict(dict)
        self.fallback = fallback

    def update(self, events: Sequence[Event], histories: dict[int, list[int]]) -> None:
        position: dict[int, int] = defaultdict(int)
        per_user: dict[int, list[int]] = defaultdict(list)
        for e in events:
            per_user[e.user].append(e.item)
        for user, items in per_user.items():
            seq = histories[user]
            start = len(seq) - len(items)
            for n in range(max(start, 1), len(seq)):
                row = self.next[seq[n - 1]]
                row[seq[n]] = row.get(seq[n], 0.0) + 1.0
            position[user] = len(seq)
        self.fallback.update(events, histories)

    def recommend(self, user: int, history: list[int], seen: set[int], k: int) -> list[int]:
        out: list[int] = []
        if history:
            row = self.next.get(history[-1], {})
            for item, _ in sorted(row.items(), key=lambda kv: -kv[1]):
                if item not in seen:
                    out.append(item)
                    if len(out) == k:
                        return out
        taken = seen | set(out)
        return out + self.fallback.recommend(user, history, taken, k - len(out))


class ItemKNN(Ranker):
    """Cosine item-kNN over co-occurrence inside each user's last ``window`` items, kept online:
    a sparse base matrix merged every ``merge_every`` events plus the pairs since."""

    name = "item-kNN (online)"

    def __init__(
        self, n_items: int, fallback: DecayedPopularity, window: int = 50, rng_seed: int = 0
    ) -> None:
        import scipy.sparse as sp

        self.sp = sp
        self.n = n_items
        self.window = window
        self.counts = np.zeros(n_items)
        self.base = sp.csr_matrix((n_items, n_items), dtype=np.float64)
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.fallback = fallback
        self.rng = np.random.default_rng(rng_seed)

    def update(self, events: Sequence[Event], histories: dict[int, list[int]]) -> None:
        per_user: dict[int, int] = defaultdict(int)
        for e in events:
            per_user[e.user] += 1
        for user, new in per_user.items():
            seq = histories[user]
            for n in range(len(seq) - new, len(seq)):
                item = seq[n]
                self.counts[item] += 1.0
                for other in seq[max(0, n - self.window) : n]:
                    self.rows += [item, other]
                    self.cols += [other, item]
        if len(self.rows) > 200_000:
            self._merge()
        self.fallback.update(events, histories)

    def _merge(self) -> None:
        if self.rows:
            delta = self.sp.csr_matrix(
                (np.ones(len(self.rows)), (self.rows, self.cols)), shape=(self.n, self.n)
            )
            self.base = (self.base + delta).tocsr()
            self.rows, self.cols = [], []

    def recommend(self, user: int, history: list[int], seen: set[int], k: int) -> list[int]:
        recent = history[-self.window :]
        if not recent:
            return self.fallback.recommend(user, history, seen, k)
        self._merge_if_needed()
        h = np.zeros(self.n)
        h[recent] = 1.0 / np.sqrt(np.maximum(self.counts[recent], 1.0))
        scores = np.asarray(self.base.T @ h).ravel() / np.sqrt(np.maximum(self.counts, 1.0))
        scores[scores <= 0] = -np.inf
        out = top_excluding(scores, sorted(seen), k, self.rng)
        if len(out) < k:
            out += self.fallback.recommend(user, history, seen | set(out), k - len(out))
        return out

    def _merge_if_needed(self) -> None:
        if self.rows:
            self._merge()


# -- SASRec ---------------------------------------------------------------------------------------


class _SASRec(nn.Module):
    def __init__(self, n_items: int, dim: int, length: int, blocks: int, dropout: float) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items + 1, dim, padding_idx=0)  # row 0: padding
        self.positions = nn.Embedding(length, dim)
        layer = nn.TransformerEncoderLayer(
            dim, 1, dim, dropout, batch_first=True, norm_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.length = length
        nn.init.normal_(self.items.weight, std=0.05)
        mask = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        x = self.items(seq) * math.sqrt(self.items.embedding_dim) + self.positions.weight[None]
        x = self.drop(x)
        pad = seq == 0
        # a fully padded row would give NaN; let padding attend to itself
        h = self.encoder(x, mask=self.mask, src_key_padding_mask=pad & ~pad.all(1, keepdim=True))
        return self.norm(h)


class SASRecFrozen(Ranker):
    """Trained on the warm-up only, then frozen; scored with each user's fresh history."""

    name = "SASRec (warm-up, frozen)"

    def __init__(
        self,
        n_items: int,
        dim: int = 64,
        length: int = 50,
        blocks: int = 2,
        dropout: float = 0.2,
        max_epochs: int = 60,
        negatives: int = 2048,
        seed: int = 0,
        log: object = print,
    ) -> None:
        torch.manual_seed(seed)
        self.n = n_items
        self.length = length
        self.model = _SASRec(n_items, dim, length, blocks, dropout)
        self.max_epochs = max_epochs
        self.negatives = negatives
        self.rng = np.random.default_rng(seed)
        self.log = log
        self.epochs = 0
        self._table: torch.Tensor | None = None

    def _windows(self, histories: dict[int, list[int]]) -> np.ndarray:
        rows = []
        L = self.length + 1
        for items in histories.values():
            seq = [i + 1 for i in items]
            for end in range(len(seq), 1, -self.length):
                part = seq[max(0, end - L) : end]
                rows.append([0] * (L - len(part)) + part)
        return np.asarray(rows, dtype=np.int64) if rows else np.zeros((0, L), dtype=np.int64)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        h = self.model(inputs)[targets > 0]
        t = targets[targets > 0]
        table = self.model.items.weight
        if self.n <= 5_000:
            logits = h @ table[1:].T
            return nn.functional.cross_entropy(logits, t - 1)
        negatives = torch.from_numpy(self.rng.integers(1, self.n + 1, size=self.negatives))
        pos = (h * table[t]).sum(1, keepdim=True)
        neg = h @ table[negatives].T
        neg = neg.masked_fill(negatives[None, :] == t[:, None], -1e9)
        logits = torch.cat([pos, neg], 1)
        return nn.functional.cross_entropy(logits, torch.zeros(len(t), dtype=torch.long))

    @torch.no_grad()
    def _validate(self, histories: dict[int, list[int]], held: dict[int, list[int]]) -> float:
        self.model.eval()
        table = self.model.items.weight[1:]
        hits, n = 0, 0
        for user, targets in held.items():
            seq = list(histories.get(user, []))
            for target in targets:
                if seq:
                    h = self.model(self._input(seq))[0, -1]
                    s = (table @ h).numpy()
                    s[seq] = -np.inf
                    hits += int(target in np.argpartition(-s, K)[:K])
                n += 1
                seq.append(target)
        self.model.train()
        return hits / max(n, 1)

    def _input(self, seq: list[int]) -> torch.Tensor:
        part = [i + 1 for i in seq[-self.length :]]
        return torch.tensor([[0] * (self.length - len(part)) + part])

    def warm(self, events: Sequence[Event], histories: dict[int, list[int]]) -> None:
        if self._table is not None:  # fitted for an earlier replay of the same warm-up
            return
        # The warm-up's last tenth (in stream order) chooses the number of epochs.
        cut = int(len(events) * 0.9)
        fit: dict[int, list[int]] = defaultdict(list)
        held: dict[int, list[int]] = defaultdict(list)
        for n, e in enumerate(events):
            (fit if n < cut else held)[e.user].append(e.item)
        best, best_epoch, patience = -1.0, 0, 0
        for epochs, hr in self._train(fit, held):
            if hr > best:
                best, best_epoch, patience = hr, epochs, 0
            else:
                patience += 1
            if patience >= 3:
                break
        self.epochs = max(best_epoch, 1)
        self.log(
            f"  SASRec: {self.epochs} epochs chosen on the warm-up's last tenth (HR@10 {best:.4f}); refit"
        )
        self.model = _SASRec(
            self.n, self.model.items.embedding_dim, self.length, len(self.model.encoder.layers), 0.2
        )
        for _ in self._train({u: list(v) for u, v in _full(events).items()}, None, self.epochs):
            pass
        self.model.eval()
        self._table = self.model.items.weight[1:].detach()

    def _train(self, fit: dict[int, list[int]], held: dict[int, list[int]] | None, epochs: int | None = None):
        windows = self._windows(fit)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, betas=(0.9, 0.98))
        self.model.train()
        total = epochs or self.max_epochs
        for epoch in range(1, total + 1):
            order = self.rng.permutation(len(windows))
            for start in range(0, len(order), 128):
                batch = torch.from_numpy(windows[order[start : start + 128]])
                loss = self._loss(batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if held is not None and (epoch % 5 == 0 or epoch == total):
                yield epoch, self._validate(fit, held)
            elif held is None:
                yield epoch, 0.0

    @torch.no_grad()
    def recommend(self, user: int, history: list[int], seen: set[int], k: int) -> list[int]:
        assert self._table is not None
        if not history:
            return []
        h = self.model(self._input(history))[0, -1]
        s = (self._table @ h).numpy()
        return top_excluding(s, sorted(seen), k, self.rng)


def _full(events: Sequence[Event]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for e in events:
        out[e.user].append(e.item)
    return out


# -- the protocol ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Per evaluated event: the rank of its item in the answer (-1: not in it)."""

    ranks: np.ndarray

    @property
    def hr(self) -> float:
        return float((self.ranks >= 0).mean()) if len(self.ranks) else float("nan")

    @property
    def ndcg(self) -> float:
        if not len(self.ranks):
            return float("nan")
        hit = self.ranks >= 0
        return float(np.where(hit, 1.0 / np.log2(np.maximum(self.ranks, 0) + 2.0), 0.0).mean())


def replay(
    rankers: Sequence[Ranker],
    events: Sequence[Event],
    warm: int,
    batch: int,
    k: int = K,
    limit: int = 0,
    progress: object = None,
) -> dict[str, Outcome]:
    """Test-then-train over ``events[warm:]`` (at most ``limit`` of them, 0: all) for every ranker."""
    histories: dict[int, list[int]] = defaultdict(list)
    for start in range(0, warm, 1000):  # the warm-up is learned in order, as the stream would be
        part = events[start : min(start + 1000, warm)]
        for e in part:
            histories[e.user].append(e.item)
        for r in rankers:
            r.update(part, histories)
    seen = {u: set(items) for u, items in histories.items()}
    for r in rankers:
        r.warm(events[:warm], histories)
    end = len(events) if not limit else min(len(events), warm + limit)
    ranks: dict[str, list[int]] = {r.name: [] for r in rankers}
    for start in range(warm, end, batch):
        part = events[start : min(start + batch, end)]
        for r in rankers:
            answers: dict[int, list[int]] = {}
            for e in part:
                if e.user not in answers:
                    answers[e.user] = r.recommend(
                        e.user, histories.get(e.user, []), seen.get(e.user, set()), k
                    )
                answer = answers[e.user]
                ranks[r.name].append(answer.index(e.item) if e.item in answer else -1)
        for e in part:
            histories[e.user].append(e.item)
            seen.setdefault(e.user, set()).add(e.item)
        for r in rankers:
            r.update(part, histories)
        if callable(progress):
            progress(start + len(part) - warm, end - warm)
    return {name: Outcome(np.asarray(v, dtype=np.int64)) for name, v in ranks.items()}
