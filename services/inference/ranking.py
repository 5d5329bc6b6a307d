"""Re-ranking and explanations: MMR diversity, exploration slots, human-readable reasons.

Everything works on small arrays (the k results, a few hundred candidates, the user's recent
items); nothing loops over the catalogue in Python.
"""

from __future__ import annotations

import math
import time

import numpy as np

from freshrec.v1 import event_pb2
from services.inference.index import EMPTY, ServingState

VERBS: dict[int, str] = {
    event_pb2.EVENT_TYPE_VIEW: "viewed",
    event_pb2.EVENT_TYPE_CLICK: "clicked",
    event_pb2.EVENT_TYPE_ADD_TO_CART: "added to your cart",
    event_pb2.EVENT_TYPE_PURCHASE: "bought",
    event_pb2.EVENT_TYPE_RATE: "rated",
    event_pb2.EVENT_TYPE_LIKE: "liked",
}


def mmr(relevance: np.ndarray, unit: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """Maximal marginal relevance: indices into the candidates, in selection order.

    Each step picks argmax of (1 - diversity) * relevance - diversity * (max cosine similarity to
    what is already picked), relevance rescaled to [0, 1] over the candidates.
    """
    n = len(relevance)
    k = min(k, n)
    if k <= 0:
        return EMPTY
    low, high = float(relevance.min()), float(relevance.max())
    rel = (relevance - low) / (high - low) if high > low else np.ones(n, dtype=np.float32)
    lam = 1.0 - diversity
    picked = [int(np.argmax(rel))]
    closest = unit @ unit[picked[0]]
    taken = np.zeros(n, dtype=bool)
    taken[picked[0]] = True
    for _ in range(k - 1):
        gain = lam * rel - diversity * closest
        gain[taken] = -np.inf
        best = int(np.argmax(gain))
        picked.append(best)
        taken[best] = True
        closest = np.maximum(closest, unit @ unit[best])
    return np.array(picked, dtype=np.int64)


def exploration_slots(k: int, share: float) -> int:
    """How many of k slots go to exploration: ceil(share * k), at most k."""
    if share <= 0 or k <= 0:
        return 0
    return min(k, math.ceil(share * k - 1e-9))


def interleave(main: list[int], explore: list[int], k: int) -> list[tuple[int, bool]]:
    """Exploration items spread evenly through the list: (index, is_exploration) pairs."""
    out: list[tuple[int, bool]] = []
    n = min(len(explore), k)
    slots = {int((j + 1) * k / (n + 1)) for j in range(n)} if n else set()
    mi = ei = 0
    for slot in range(k):
        if (slot in slots and ei < n) or mi >= len(main):
            if ei >= len(explore):
                break
            out.append((explore[ei], True))
            ei += 1
        else:
            out.append((main[mi], False))
            mi += 1
    return out


def choose_exploration(
    state: ServingState,
    vector: np.ndarray,
    n: int,
    banned: np.ndarray,
    allowed: np.ndarray | None,
    rng: np.random.Generator,
    sample: int,
) -> np.ndarray:
    """Up to n new or under-exposed positions: a random sample of the pool, best-scoring first."""
    if n <= 0:
        return EMPTY
    pool, _new = state.exploration_pool(time.time())
    if allowed is not None:
        pool = pool[np.isin(pool, allowed)]
    if len(banned):
        pool = pool[~np.isin(pool, banned)]
    if not len(pool):
        return EMPTY
    if len(pool) > sample:
        pool = rng.choice(pool, size=sample, replace=False)
    scores = state.score_positions(pool, vector)
    best = np.argsort(-scores, kind="stable")[:n]
    return pool[best]


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{max(int(seconds), 0)} s ago"
    if seconds < 5400:
        return f"{int(seconds // 60)} min ago"
    if seconds < 172_800:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86_400)} days ago"


def exploration_reason(state: ServingState, position: int, now: float) -> str:
    if state.is_fresh(position):
        return (
            f"exploring: new in the catalogue, not yet in model {state.model.version}; "
            f"scored from {state.fresh_via}"
        )
    created = float(state.created_at[position])
    if created and created >= now - state.exploration.new_item_window_s:
        return f"exploring: new in the catalogue (added {_ago(now - created)})"
    shown = int(state.impressions[position])
    return f"exploring: rarely shown so far ({shown} time{'s' if shown != 1 else ''} on this replica)"


def model_reasons(
    state: ServingState,
    positions: np.ndarray,
    history: list[tuple[str, int]],
) -> list[str]:
    """For each result: the user's recent item it is closest to (cosine of item embeddings)."""
    version = state.model.version
    recent: dict[int, int] = {}
    for item_id, event_type in history:
        position = state.position(item_id)
        if position and event_type != event_pb2.EVENT_TYPE_DISLIKE:
            recent.pop(position, None)
            recent[position] = event_type  # newest last
    history_positions = np.fromiter(recent, dtype=np.int64)
    # An item no longer served explains nothing either.
    history_positions = history_positions[~np.isin(history_positions, state.unservable(time.time()))]
    if not len(history_positions) or not len(positions):
        generic = f"matches your taste as learned by model {version}"
        return [_fresh_note(state, p, generic) for p in positions]
    similarity = state.unit_embeddings(positions) @ state.unit_embeddings(history_positions).T
    closest = history_positions[np.argmax(similarity, axis=1)]
    reasons = []
    for position, anchor in zip(positions, closest, strict=True):
        verb = VERBS.get(recent[int(anchor)], "interacted with")
        title = state.title(state.item_id(int(anchor)))
        reasons.append(_fresh_note(state, int(position), f"because you recently {verb} “{title}”"))
    return reasons


def _fresh_note(state: ServingState, position: int, reason: str) -> str:
    if state.is_fresh(position):
        return f"{reason}; a new item, scored from {state.fresh_via}"
    return reason
