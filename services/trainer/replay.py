"""What the learner learns from: sequences cut into chunks, and the replay reservoir.

A chunk predicts each of its targets from the items before it, reading exactly the window the
exported user tower reads when serving. ``ChunkBuilder`` cuts user sequences into chunks;
``ReplayBuffer`` keeps a reservoir of older chunks that online updates mix in against forgetting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.trainer.model import PAD
from services.trainer.scoring import Entry


@dataclass
class Chunks:
    """Sequences to score or learn: every position with a target predicts it from the items before.

    inputs/types/targets [M, S] (left-padded, 0 = nothing), weights [M, S], users [M],
    contexts [M, S, K] (the context of the event each position predicts) or None.
    """

    inputs: np.ndarray
    types: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    users: np.ndarray
    contexts: np.ndarray | None
    #: The stream sequence of each target (0 when unknown), for holding the newest events out.
    sequences: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def with_targets(self, keep: np.ndarray) -> Chunks:
        """The same chunks with only the targets where ``keep`` [M, S] is true."""
        return Chunks(
            self.inputs,
            self.types,
            np.where(keep, self.targets, 0),
            np.where(keep, self.weights, 0.0).astype(np.float32),
            self.users,
            self.contexts,
            None if self.sequences is None else np.where(keep, self.sequences, 0),
        )

    def split_newest(self, count: int) -> tuple[Chunks, Chunks]:
        """(older targets, the ``count`` newest targets by stream sequence)."""
        assert self.sequences is not None
        numbered = self.sequences[self.targets > 0]
        if not count or not len(numbered):
            return self, self.with_targets(np.zeros_like(self.targets, dtype=bool))
        cutoff = np.sort(numbered)[-min(count, len(numbered))]
        newest = (self.sequences >= cutoff) & (self.targets > 0)
        return self.with_targets((self.targets > 0) & ~newest), self.with_targets(newest)

    def split_last_of_users(self, count: int, rng: np.random.Generator) -> tuple[Chunks, Chunks]:
        """(every other target, about ``count`` held-out targets: the last few of every user, as
        many per user as it takes): a held-out set that speaks for all users, where the newest
        events of a log may come from a few of them."""
        assert self.sequences is not None
        held = np.zeros_like(self.targets, dtype=bool)
        last = self.sequences[:, -1] * (self.targets[:, -1] > 0)
        if not count or not last.any():
            return self, self.with_targets(held)
        # Per user, the chunk ending with the user's newest target (chunks end with a target).
        order = np.lexsort((last, self.users))
        ends = order[np.r_[self.users[order][1:] != self.users[order][:-1], True]]
        ends = ends[last[ends] > 0]
        per_user = max(1, -(-count // len(ends)))
        for k in range(1, min(per_user, self.targets.shape[1] - 1) + 1):
            held[ends, -k] = self.targets[ends, -k] > 0
        # Keep every user's first target to learn from: a user whose whole chunk would be held out.
        return self.with_targets((self.targets > 0) & ~held), self.with_targets(held)

    def target_span(self) -> int:
        """Trailing columns that hold every target (0: none): what a step has to compute."""
        aimed = (self.targets > 0).any(0)
        return int(self.targets.shape[1] - aimed.argmax()) if aimed.any() else 0

    @property
    def n_targets(self) -> int:
        return int((self.targets > 0).sum())

    def select(self, index: np.ndarray) -> Chunks:
        return Chunks(
            self.inputs[index],
            self.types[index],
            self.targets[index],
            self.weights[index],
            self.users[index],
            None if self.contexts is None else self.contexts[index],
            None if self.sequences is None else self.sequences[index],
        )

    @staticmethod
    def concat(parts: Sequence[Chunks]) -> Chunks:
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        width = max(p.inputs.shape[1] for p in parts)

        def left(a: np.ndarray) -> np.ndarray:
            pad = [(0, 0), (width - a.shape[1], 0)] + [(0, 0)] * (a.ndim - 2)
            return np.pad(a, pad)

        contexts = None
        if parts[0].contexts is not None:
            contexts = np.concatenate([left(p.contexts) for p in parts if p.contexts is not None])
        sequences = [
            left(p.sequences) if p.sequences is not None else np.zeros_like(left(p.targets)) for p in parts
        ]
        return Chunks(
            np.concatenate([left(p.inputs) for p in parts]),
            np.concatenate([left(p.types) for p in parts]),
            np.concatenate([left(p.targets) for p in parts]),
            np.concatenate([left(p.weights) for p in parts]),
            np.concatenate([p.users for p in parts]),
            contexts,
            np.concatenate(sequences),
        )


class ChunkBuilder:
    """Cuts user sequences into chunks whose every target sees exactly its served window."""

    def __init__(self, max_history: int, max_context: int, context: int | None = None) -> None:
        self.length = max_history
        self.k = max_context
        #: Items before a chunk's first target it reads (L: every target sees its full window).
        self.context = max(1, min(max_history, max_history if context is None else context))
        self.rows: list[
            tuple[list[int], list[int], list[int], list[float], list[tuple[int, ...]], list[int]]
        ] = []
        self.users: list[int] = []
        #: Per chunk: for each target position, the index of the target in the user's sequence.
        self.positions: list[list[tuple[int, int]]] = []

    def add(
        self,
        seq: Sequence[Entry],
        first: int,
        weights: Sequence[float],
        user: int,
        numbers: Sequence[int] | None = None,
    ) -> list[int]:
        """Targets ``seq[first:]`` (weights and stream sequence numbers aligned with them);
        returns the indices of the chunks made."""
        made = []
        n = len(seq)
        # Blocks of at most L targets, aligned on the newest item (the freshest get full chunks).
        blocks = []
        end = n
        while end > first:
            blocks.append((max(first, end - self.length), end))
            end = blocks[-1][0]
        for start, end in reversed(blocks):
            a = max(0, start - self.context)
            lead = 1 if a == 0 else 0
            inputs, types, targets, wts, ctxs, where, nums = [], [], [], [], [], [], []
            if lead:
                inputs.append(PAD)
                types.append(0)
            for i in range(a, end - 1):
                inputs.append(seq[i][0])
                types.append(seq[i][1])
            for p in range(len(inputs)):
                nxt = a + p - lead + 1
                if start <= nxt < end:
                    targets.append(seq[nxt][0])
                    wts.append(weights[nxt - first])
                    ctxs.append(seq[nxt][2])
                    nums.append(numbers[nxt - first] if numbers is not None else 0)
                    where.append((p, nxt))
                else:
                    targets.append(PAD)
                    wts.append(0.0)
                    ctxs.append(())
                    nums.append(0)
            self.rows.append((inputs, types, targets, wts, ctxs, nums))
            self.users.append(user)
            self.positions.append(where)
            made.append(len(self.rows) - 1)
        return made

    def build(self) -> Chunks:
        m = len(self.rows)
        width = max((len(r[0]) for r in self.rows), default=1)
        inputs = np.zeros((m, width), dtype=np.int64)
        types = np.zeros((m, width), dtype=np.int64)
        targets = np.zeros((m, width), dtype=np.int64)
        weights = np.zeros((m, width), dtype=np.float32)
        contexts = np.zeros((m, width, self.k), dtype=np.int64) if self.k else None
        numbers = np.zeros((m, width), dtype=np.int64)
        for c, (ins, tys, tgs, wts, ctxs, nums) in enumerate(self.rows):
            off = width - len(ins)
            inputs[c, off:] = ins
            types[c, off:] = tys
            targets[c, off:] = tgs
            weights[c, off:] = wts
            numbers[c, off:] = nums
            if contexts is not None:
                for p, ctx in enumerate(ctxs):
                    if ctx:
                        contexts[c, off + p, : len(ctx)] = ctx
        return Chunks(
            inputs, types, targets, weights, np.array(self.users, dtype=np.int64), contexts, numbers
        )

    def offset(self, chunk: int, width: int) -> int:
        return width - len(self.rows[chunk][0])


class ReplayBuffer:
    """A reservoir sample of past training chunks (each a user's events with their windows).

    Replaying whole chunks costs one forward pass for up to L targets, where replaying single
    events would cost one per event.
    """

    def __init__(self, capacity: int, max_history: int, max_context: int) -> None:
        self.capacity = capacity
        width = 2 * max_history
        self.inputs = np.zeros((capacity, width), dtype=np.int64)
        self.types = np.zeros((capacity, width), dtype=np.int8)
        self.targets = np.zeros((capacity, width), dtype=np.int64)
        self.weights = np.zeros((capacity, width), dtype=np.float32)
        self.users = np.zeros(capacity, dtype=np.int64)
        self.max_context = max_context
        self.contexts = np.zeros((capacity, width, max_context), dtype=np.int64) if max_context else None
        #: Targets per slot (what ``sample`` averages, without scanning the whole buffer each step).
        self.counts = np.zeros(capacity, dtype=np.int64)
        self.size = 0
        self.offered = 0

    def offer(self, rng: np.random.Generator, chunks: Chunks) -> None:
        if not self.capacity:
            return
        width = self.inputs.shape[1]
        for c in range(len(chunks)):
            if not (chunks.targets[c] > 0).any():
                continue
            self.offered += 1
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                slot = int(rng.integers(0, self.offered))
                if slot >= self.capacity:
                    continue
            w = min(width, chunks.inputs.shape[1])
            for name in ("inputs", "types", "targets", "weights"):
                mine = getattr(self, name)
                mine[slot] = 0
                mine[slot, width - w :] = getattr(chunks, name)[c, -w:]
            self.users[slot] = chunks.users[c]
            self.counts[slot] = int((self.targets[slot] > 0).sum())
            if self.contexts is not None and chunks.contexts is not None:
                self.contexts[slot] = 0
                self.contexts[slot, width - w :] = chunks.contexts[c, -w:]

    def sample(self, rng: np.random.Generator, targets: int) -> Chunks | None:
        """Random chunks holding about ``targets`` targets in all."""
        if not targets or not self.size:
            return None
        per_chunk = max(1.0, float(self.counts[: self.size].sum()) / self.size)
        index = rng.integers(0, self.size, size=max(1, math.ceil(targets / per_chunk)))
        inputs = self.inputs[index]
        used = np.flatnonzero(inputs.any(axis=0) | self.targets[index].any(axis=0))
        start = int(used[0]) if len(used) else inputs.shape[1] - 1
        return Chunks(
            inputs[:, start:],
            self.types[index, start:].astype(np.int64),
            self.targets[index, start:],
            self.weights[index, start:],
            self.users[index],
            None if self.contexts is None else self.contexts[index, start:],
        )

    def forget_items(self, rows: np.ndarray) -> None:
        """Drops expired item rows: from inputs (as padding) and as targets."""
        n = self.size
        self.inputs[:n][np.isin(self.inputs[:n], rows)] = 0
        gone = np.isin(self.targets[:n], rows)
        self.targets[:n][gone] = 0
        self.weights[:n][gone] = 0.0
        self.counts[:n] = (self.targets[:n] > 0).sum(1)

    def forget_users(self, rows: np.ndarray) -> None:
        """Drops the chunks of these user rows whole (their items are that user's history)."""
        n = self.size
        keep = np.flatnonzero(~np.isin(self.users[:n], rows))
        if len(keep) == n:
            return
        arrays = ["inputs", "types", "targets", "weights", "users", "counts"]
        if self.contexts is not None:
            arrays.append("contexts")
        for name in arrays:
            array = getattr(self, name)
            array[: len(keep)] = array[keep]
            array[len(keep) : n] = 0
        self.size = len(keep)

    def state(self) -> dict[str, Any]:
        n = self.size
        doc: dict[str, Any] = {
            name: getattr(self, name)[:n].copy()
            for name in ("inputs", "types", "targets", "weights", "users")
        }
        doc["contexts"] = None if self.contexts is None else self.contexts[:n].copy()
        doc["offered"] = self.offered
        return doc

    def load(self, state: dict[str, Any]) -> None:
        n = min(len(state["users"]), self.capacity)
        width = min(self.inputs.shape[1], state["inputs"].shape[1])
        for name in ("inputs", "types", "targets", "weights"):
            getattr(self, name)[:n, -width:] = state[name][:n, -width:]
        self.users[:n] = state["users"][:n]
        if self.contexts is not None and state.get("contexts") is not None:
            k = min(self.contexts.shape[2], state["contexts"].shape[2])
            self.contexts[:n, -width:, :k] = state["contexts"][:n, -width:, :k]
        self.size = n
        self.counts[:n] = (self.targets[:n] > 0).sum(1)
        self.offered = int(state["offered"])


@dataclass
class UserSequence:
    """One user's items in order; ``first`` is the first one to learn (earlier ones are context)."""

    entries: list[Entry]
    weights: list[float]
    first: int
    numbers: list[int] = field(default_factory=list)  # stream sequences of entries[first:]
