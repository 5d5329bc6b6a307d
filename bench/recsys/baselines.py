"""The baselines BENCHMARKS.md names, computed beside freshrec on the same split.

Offline (protocol A): popularity, item-kNN (cosine, top-k neighbours), EASE (closed form),
BPR-MF (matrix factorisation with item biases, Adam, uniform negatives). Online (protocol B):
popularity with running counts, item-kNN over incrementally updated co-occurrences, BPR-MF
with SGD steps on each micro-batch; each also frozen after warm-up (histories still fresh).
Scores are dense [users, n_items + 1] arrays; column 0 is unused.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn


def interaction_matrix(histories: dict[int, list[int]], n_users: int, n_items: int) -> sp.csr_matrix:
    rows, cols = [], []
    for u, items in histories.items():
        rows += [u] * len(items)
        cols += items
    m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n_users + 1, n_items + 1))
    m.data[:] = 1.0  # binary, repeats collapsed
    return m


class Popularity:
    def fit(self, x: sp.csr_matrix) -> Popularity:
        self.counts = np.asarray(x.sum(axis=0)).ravel().astype(np.float64)
        return self

    def scores(self, users: np.ndarray, x: sp.csr_matrix) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts))).copy()


class ItemKNN:
    """Cosine similarity between item columns, keeping each item's ``k`` nearest neighbours."""

    def __init__(self, k: int = 20) -> None:
        self.k = k

    def fit(self, x: sp.csr_matrix) -> ItemKNN:
        co = (x.T @ x).toarray().astype(np.float64)
        norms = np.sqrt(np.diag(co))
        norms[norms == 0] = 1.0
        sim = co / norms[:, None] / norms[None, :]
        np.fill_diagonal(sim, 0.0)
        if self.k and self.k < sim.shape[0]:
            cut = np.partition(sim, -self.k, axis=0)[-self.k]
            sim[sim < cut[None, :]] = 0.0
        self.sim = sim
        return self

    def scores(self, users: np.ndarray, x: sp.csr_matrix) -> np.ndarray:
        return np.asarray(x[users] @ self.sim)


class EASE:
    def __init__(self, lam: float = 500.0) -> None:
        self.lam = lam

    def fit(self, x: sp.csr_matrix) -> EASE:
        gram = (x.T @ x).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += self.lam
        p = np.linalg.inv(gram)
        b = -p / np.diag(p)[None, :]
        np.fill_diagonal(b, 0.0)
        self.b = b
        return self

    def scores(self, users: np.ndarray, x: sp.csr_matrix) -> np.ndarray:
        return np.asarray(x[users] @ self.b)


class BPR(nn.Module):
    """Matrix factorisation with item biases, trained with BPR on uniform negatives."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.users = nn.Embedding(n_users + 1, dim)
        self.items = nn.Embedding(n_items + 1, dim)
        self.bias = nn.Embedding(n_items + 1, 1)
        nn.init.normal_(self.users.weight, std=0.05)
        nn.init.normal_(self.items.weight, std=0.05)
        nn.init.zeros_(self.bias.weight)
        self.rng = np.random.default_rng(seed)
        self.n_items = n_items

    def grow_users(self, n_users: int) -> None:
        if n_users + 1 > self.users.num_embeddings:
            old = self.users.weight.data
            new = torch.zeros(n_users + 1, old.shape[1])
            new[: old.shape[0]] = old
            self.users = nn.Embedding.from_pretrained(new, freeze=False)

    def step(
        self, users: np.ndarray, items: np.ndarray, optimizer: torch.optim.Optimizer, batch: int = 1024
    ) -> float:
        order = self.rng.permutation(len(users))
        total = 0.0
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            u = torch.as_tensor(users[idx])
            i = torch.as_tensor(items[idx])
            j = torch.as_tensor(self.rng.integers(1, self.n_items + 1, size=len(idx)))
            eu = self.users(u)
            diff = (eu * (self.items(i) - self.items(j))).sum(1) + (self.bias(i) - self.bias(j)).squeeze(1)
            loss = -torch.nn.functional.logsigmoid(diff).mean() + 1e-5 * (eu.pow(2).sum() / len(idx))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        return total / max(len(users), 1)

    @torch.no_grad()
    def scores(self, users: np.ndarray, x: sp.csr_matrix | None = None) -> np.ndarray:
        u = torch.as_tensor(np.minimum(users, self.users.num_embeddings - 1))
        s = self.users(u) @ self.items.weight.T + self.bias.weight.T
        return s.numpy().astype(np.float64)


def pairs(histories: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    users = np.array([u for u, items in histories.items() for _ in items], dtype=np.int64)
    items = np.array([i for its in histories.values() for i in its], dtype=np.int64)
    return users, items


class OnlineCooccurrence:
    """Item-kNN for a stream: co-occurrence counts within users, updated as events arrive."""

    def __init__(self, n_items: int) -> None:
        self.co = np.zeros((n_items + 1, n_items + 1), dtype=np.float32)
        self.sim: np.ndarray | None = None

    def add(self, history: list[int], item: int) -> None:
        if history:
            h = np.asarray(history)
            self.co[item, h] += 1.0
            self.co[h, item] += 1.0
        self.co[item, item] += 1.0

    def refresh(self) -> None:
        norms = np.sqrt(np.diag(self.co)).astype(np.float32)
        norms[norms == 0] = 1.0
        sim = self.co / norms[:, None] / norms[None, :]
        np.fill_diagonal(sim, 0.0)
        self.sim = sim

    def scores(self, history_rows: np.ndarray) -> np.ndarray:
        assert self.sim is not None
        return (history_rows @ self.sim).astype(np.float64)
