"""MovieLens-100K for the benchmark protocols (BENCHMARKS.md), read from ``FRESHREC_ML100K``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ML100K = Path(os.environ.get("FRESHREC_ML100K", ROOT.parent / "shared/data/ml-100k"))


@dataclass
class Ratings:
    """Parallel arrays of (user, item, timestamp); ids are MovieLens' own (1-based)."""

    user: np.ndarray
    item: np.ndarray
    time: np.ndarray
    n_users: int
    n_items: int


def load(folder: Path = ML100K) -> Ratings:
    raw = np.loadtxt(folder / "u.data", dtype=np.int64)
    return Ratings(raw[:, 0], raw[:, 1], raw[:, 3], int(raw[:, 0].max()), int(raw[:, 1].max()))


def user_sequences(r: Ratings, order: str, seed: int = 0) -> dict[int, list[tuple[int, int]]]:
    """Each user's (item, time) sorted by (time, item) or, with ``order="random"``, by time with a
    seeded random order inside each second."""
    if order == "sorted":
        tie = r.item
    elif order == "random":
        tie = np.random.default_rng(seed).permutation(len(r.item))
    else:
        raise ValueError(f"unknown order {order!r}")
    index = np.lexsort((tie, r.time, r.user))
    sequences: dict[int, list[tuple[int, int]]] = {}
    for k in index:
        sequences.setdefault(int(r.user[k]), []).append((int(r.item[k]), int(r.time[k])))
    return sequences


def stream_order(r: Ratings) -> np.ndarray:
    """Protocol B's order: (time, user, item)."""
    return np.lexsort((r.item, r.user, r.time))


def read_genres(folder: Path = ML100K) -> np.ndarray:
    """[n_items + 1, 19] genre flags (row 0 empty)."""
    lines = (folder / "u.item").read_text(encoding="latin-1").splitlines()
    flags = np.zeros((len(lines) + 1, 19), dtype=np.float32)
    for line in lines:
        parts = line.split("|")
        flags[int(parts[0])] = [float(x) for x in parts[5:24]]
    return flags
