"""Ranking metrics over a full catalogue, with ties counted at their expected rank.

A target tied with ``e`` other items sits at each of ranks ``g .. g+e`` (``g`` items score
strictly higher) with equal probability, so a constant scorer gets exactly the random figure
and never a lucky one. Excluded candidates (seen items, unknown rows) must be ``-inf`` before
the call; a target scored ``-inf`` or NaN counts as a miss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def _cumulative_discounts(n: int) -> torch.Tensor:
    """``c[r] = sum_{s < r} 1 / log2(s + 2)``, for r in 0..n."""
    ranks = torch.arange(n, dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(1.0 / torch.log2(ranks + 2), 0)])


def rank_metrics(
    scores: torch.Tensor, targets: torch.Tensor, k: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected HR@k and NDCG@k per row: scores [B, N] (excluded = -inf), targets [B] -> ([B], [B])."""
    scores = scores.detach()
    rows = torch.arange(scores.shape[0])
    target_scores = scores[rows, targets].unsqueeze(1)
    greater = (scores > target_scores).sum(1).to(torch.float64)
    ties = (scores == target_scores).sum(1).to(torch.float64) - 1.0
    discounts = _cumulative_discounts(k)
    low = greater.clamp(max=k)
    high = (greater + ties + 1.0).clamp(max=k)
    span = ties + 1.0
    hr = (high - low) / span
    ndcg = (discounts[high.long()] - discounts[low.long()]) / span
    valid = torch.isfinite(target_scores.squeeze(1))
    zero = torch.zeros_like(hr)
    return torch.where(valid, hr, zero), torch.where(valid, ndcg, zero)


@dataclass
class Paired:
    """Running paired comparison of two models on the same events (a minus b, per event)."""

    n: int = 0
    a: float = 0.0
    b: float = 0.0
    diff_sq: float = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.n += int(a.numel())
        self.a += float(a.sum())
        self.b += float(b.sum())
        self.diff_sq += float(((a - b) ** 2).sum())

    @property
    def mean_a(self) -> float:
        return self.a / self.n if self.n else 0.0

    @property
    def mean_b(self) -> float:
        return self.b / self.n if self.n else 0.0

    def worse(self, tolerance: float, min_events: int) -> bool:
        """True when a trails b by more than the tolerance and two standard errors."""
        if self.n < max(min_events, 2):
            return False
        mean = (self.a - self.b) / self.n
        variance = max(self.diff_sq / self.n - mean * mean, 0.0) * self.n / (self.n - 1)
        standard_error = math.sqrt(variance / self.n)
        return mean < -max(tolerance, 2.0 * standard_error)

    def state(self) -> list[float]:
        return [self.n, self.a, self.b, self.diff_sq]

    @classmethod
    def from_state(cls, state: list[float]) -> Paired:
        return cls(int(state[0]), float(state[1]), float(state[2]), float(state[3]))


@dataclass
class Running:
    """Running mean of per-event figures, overall and over a recent window of events."""

    window: int = 2000
    evaluated: int = 0
    hr: float = 0.0
    ndcg: float = 0.0
    recent_hr: list[float] = field(default_factory=list)
    recent_ndcg: list[float] = field(default_factory=list)

    def add(self, hr: torch.Tensor, ndcg: torch.Tensor) -> None:
        self.evaluated += int(hr.numel())
        self.hr += float(hr.sum())
        self.ndcg += float(ndcg.sum())
        self.recent_hr = (self.recent_hr + hr.tolist())[-self.window :]
        self.recent_ndcg = (self.recent_ndcg + ndcg.tolist())[-self.window :]

    def as_metrics(self, prefix: str = "prequential") -> dict[str, float]:
        if not self.evaluated:
            return {f"{prefix}_evaluated": 0.0}
        n = len(self.recent_hr)
        return {
            f"{prefix}_evaluated": float(self.evaluated),
            f"{prefix}_hr@10": self.hr / self.evaluated,
            f"{prefix}_ndcg@10": self.ndcg / self.evaluated,
            f"{prefix}_hr@10_recent": sum(self.recent_hr) / n,
            f"{prefix}_ndcg@10_recent": sum(self.recent_ndcg) / n,
        }

    def state(self) -> dict[str, object]:
        return {
            "window": self.window,
            "evaluated": self.evaluated,
            "hr": self.hr,
            "ndcg": self.ndcg,
            "recent_hr": list(self.recent_hr),
            "recent_ndcg": list(self.recent_ndcg),
        }

    @classmethod
    def from_state(cls, state: dict[str, object], window: int) -> Running:
        r = cls(window=window)
        # The values come back from a checkpoint as plain objects (what ``state`` wrote).
        r.evaluated = int(state["evaluated"])  # type: ignore[call-overload]
        r.hr = float(state["hr"])  # type: ignore[arg-type]
        r.ndcg = float(state["ndcg"])  # type: ignore[arg-type]
        r.recent_hr = list(state["recent_hr"])[-window:]  # type: ignore[call-overload]
        r.recent_ndcg = list(state["recent_ndcg"])[-window:]  # type: ignore[call-overload]
        return r
