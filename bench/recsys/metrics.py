"""Full-ranking HR@k and NDCG@k with ties at their expected rank (the trainer's own function)."""

from __future__ import annotations

import numpy as np
import torch

from services.trainer.evaluation import rank_metrics


def rank(
    scores: np.ndarray, targets: np.ndarray, excluded: list[np.ndarray], ks: tuple[int, ...] = (10, 20)
) -> dict[str, np.ndarray]:
    """Per-row figures: scores [B, N] (column 0 unused), targets [B], items to exclude per row."""
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64)).clone()
    s[:, 0] = -np.inf
    for row, items in enumerate(excluded):
        if len(items):
            s[row, torch.as_tensor(np.asarray(items, dtype=np.int64))] = -np.inf
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hr, ndcg = rank_metrics(s, t, k)
        out[f"hr@{k}"] = hr.numpy()
        out[f"ndcg@{k}"] = ndcg.numpy()
    return out


def finite_everywhere(scores: np.ndarray) -> bool:
    """Every real item (column 1..N) has a finite score."""
    return bool(np.isfinite(np.asarray(scores)[:, 1:]).all())
