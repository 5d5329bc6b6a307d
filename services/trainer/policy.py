"""Which ranker answers which requests: the model, or item popularity, chosen by what wins.

A young model, a user with no history, a catalogue where items live for a day: the model is not
always the best answer, and which fallback is best depends on the data. So the trainer keeps
item popularity decayed over *events* at a few half-lives (how many events ago an interaction
happened, never how many seconds: a stream's clock may run at any speed, a backfill of years may
arrive in minutes), scores every ranker prequentially on the same requests, per segment of
history length, and writes the winner of each segment into the export (``serving.policy`` in the
manifest, with the popularity columns in ``popularity.npy``). Inference answers each request
with its segment's ranker, and the trainer's served figures use the very same choice.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np

MODEL = "model"
#: Half-lives of item popularity, in events (interactions) of the stream.
HALF_LIVES = (1_000, 10_000, 100_000)
POPULAR = tuple(f"popular:{h}" for h in HALF_LIVES)
#: What followed the user's last item in others' sequences, the rest by popularity (``FollowUps``).
FOLLOW_UP = "follow-up"
#: The popularity column follow-ups fall back to.
FOLLOW_UP_BACKOFF = 1
RANKERS = (MODEL, *POPULAR, FOLLOW_UP)
#: Follow-ups kept per item in an export.
FOLLOW_UP_WIDTH = 50
#: Segments by how many items the user touched before the request: their lower bounds.
SEGMENTS = (0, 1, 5)
SEGMENT_NAMES = ("new", "short", "long")


def segment_of(touched: np.ndarray) -> np.ndarray:
    """The segment index of each request, by the number of items its user touched before it."""
    return np.searchsorted(np.asarray(SEGMENTS), touched, side="right") - 1


class Popularity:
    """Decayed interaction weights per item row, one column per half-life (in events).

    An interaction counts ``weight * 2 ** (-age / half_life)`` with age in events since; kept as
    ``weight * exp(rate * clock)`` and rescaled before it overflows (ranks never change)."""

    def __init__(self, capacity: int = 1024) -> None:
        self.rates = np.array([math.log(2.0) / h for h in HALF_LIVES])
        self.counts = np.zeros((capacity, len(HALF_LIVES)))
        self.clock = 0

    def ensure(self, capacity: int) -> None:
        if capacity > len(self.counts):
            grown = np.zeros((max(capacity, 2 * len(self.counts)), len(HALF_LIVES)))
            grown[: len(self.counts)] = self.counts
            self.counts = grown

    def add(self, rows: np.ndarray, weights: np.ndarray) -> None:
        """Interactions in stream order."""
        if not len(rows):
            return
        self.ensure(int(rows.max()) + 1)
        clocks = self.clock + np.arange(1, len(rows) + 1)
        np.add.at(self.counts, rows, weights[:, None] * np.exp(clocks[:, None] * self.rates[None, :]))
        self.clock += len(rows)
        if self.clock * self.rates.max() > 200.0:  # rescale long before exp overflows
            self.counts *= np.exp(-self.clock * self.rates)[None, :]
            self.clock = 0

    def reset_rows(self, rows: np.ndarray) -> None:
        self.counts[rows[rows < len(self.counts)]] = 0.0

    def columns(self, n: int) -> np.ndarray:
        """[n, H] scores (each column scaled so its largest is 1: only the order matters)."""
        out = np.zeros((n, len(HALF_LIVES)), dtype=np.float64)
        m = min(n, len(self.counts))
        out[:m] = self.counts[:m]
        top = out.max(0)
        return out / np.where(top > 0, top, 1.0)

    def state(self) -> dict[str, Any]:
        return {"counts": self.counts.copy(), "clock": self.clock}

    def load(self, state: dict[str, Any]) -> None:
        self.counts = np.asarray(state["counts"], dtype=np.float64)
        self.clock = int(state["clock"])


class FollowUps:
    """How often item b came right after item a in a user's sequence of positive interactions.

    Answers "what do people take after this?" from a single co-occurrence, where a model needs
    many: the fallback that wins on short sessions and long-tail catalogues. Served from a table of
    each item's most frequent follow-ups (``table``, scored by ``follow_up_scores``)."""

    def __init__(self) -> None:
        self.next: dict[int, dict[int, float]] = {}

    def add(self, pairs: Iterable[tuple[int, int]], count: float = 1.0) -> None:
        for prev, item in pairs:
            row = self.next.setdefault(prev, {})
            row[item] = row.get(item, 0.0) + count
            if row[item] <= 0:
                del row[item]

    def forget_rows(self, rows: Iterable[int]) -> None:
        gone = set(int(r) for r in rows)
        for r in gone:
            self.next.pop(r, None)
        for row in self.next.values():
            for r in gone & row.keys():
                del row[r]

    def table(self, rows: int, width: int = FOLLOW_UP_WIDTH) -> tuple[np.ndarray, np.ndarray]:
        """The ``width`` most frequent follow-ups of every row: items [rows, width] (0: none) and
        their counts, best first."""
        items = np.zeros((rows, width), dtype=np.int64)
        counts = np.zeros((rows, width), dtype=np.float32)
        for prev, row in self.next.items():
            if prev >= rows or not row:
                continue
            best = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:width]
            items[prev, : len(best)] = [i for i, _ in best]
            counts[prev, : len(best)] = [c for _, c in best]
        return items, counts

    def state(self) -> dict[int, dict[int, float]]:
        return {k: dict(v) for k, v in self.next.items()}

    def load(self, state: dict[int, dict[int, float]]) -> None:
        self.next = {int(k): {int(i): float(c) for i, c in v.items()} for k, v in state.items()}


def follow_up_scores(
    items: np.ndarray, counts: np.ndarray, last: np.ndarray, backoff: np.ndarray
) -> np.ndarray:
    """[Q, N] as an export serves them: the follow-up counts of each request's last item over half
    the back-off popularity column (at most 1, so any follow-up outranks what never followed)."""
    out = np.tile(0.5 * backoff, (len(last), 1))
    for q, prev in enumerate(last.tolist()):
        if 0 < prev < len(items):
            keep = items[prev] > 0
            out[q, items[prev][keep]] += counts[prev][keep]
    return out


class Policy:
    """Recent prequential hits of every ranker per segment, and the winner of each segment."""

    def __init__(self, window: int = 2_000, min_events: int = 200) -> None:
        self.window = window
        self.min_events = min_events
        self.hits: dict[tuple[int, str], deque[float]] = {}

    def record(self, segments: np.ndarray, ranker: str, hits: np.ndarray) -> None:
        for s in np.unique(segments):
            recent = self.hits.setdefault((int(s), ranker), deque(maxlen=self.window))
            recent.extend(float(h) for h in hits[segments == s])

    def forget(self, ranker: str) -> None:
        """Drops a ranker's figures (the model's, after a fit made it another model)."""
        self.hits = {key: v for key, v in self.hits.items() if key[1] != ranker}

    def figure(self, segment: int, ranker: str) -> tuple[float, int]:
        recent = self.hits.get((segment, ranker))
        return (sum(recent) / len(recent), len(recent)) if recent else (0.0, 0)

    def choice(self) -> dict[str, str]:
        """Per segment (by name): the ranker with the best recent HR@10 among those measured on
        enough requests; the model until it is measured itself (after a fit, say)."""
        out = {}
        for s, name in enumerate(SEGMENT_NAMES):
            best, best_hr = MODEL, -1.0
            if self.figure(s, MODEL)[1] < self.min_events:
                out[name] = MODEL
                continue
            for ranker in RANKERS:
                hr, n = self.figure(s, ranker)
                if n >= self.min_events and hr > best_hr:
                    best, best_hr = ranker, hr
            out[name] = best
        return out

    def figures(self) -> dict[str, float]:
        """``policy_<segment>_<ranker>_hr@10`` for GetTrainerStatus."""
        out = {}
        for s, name in enumerate(SEGMENT_NAMES):
            for ranker in RANKERS:
                hr, n = self.figure(s, ranker)
                if n:
                    out[f"policy_{name}_{ranker}_hr@10"] = hr
        return out

    def state(self) -> dict[str, Any]:
        return {f"{s}|{r}": list(v) for (s, r), v in self.hits.items()}

    def load(self, state: dict[str, Any]) -> None:
        self.hits = {}
        for key, values in state.items():
            s, r = key.split("|", 1)
            self.hits[(int(s), r)] = deque(values, maxlen=self.window)


def ranker_of(policy: dict[str, str], touched: np.ndarray) -> list[str]:
    """The ranker a policy picks for requests whose users touched ``touched`` items."""
    return [policy.get(SEGMENT_NAMES[s], MODEL) for s in segment_of(touched)]
