"""Prequential scoring as inference serves: one request per group of a user's events.

Inference answers a request from the user's history at that moment: the last ``L`` items the
user tower reads (oldest first, left-padded; items the model does not know are skipped), the
user's id row, and every item the user touched left out. A producer's call carries events the
answer before it could not have seen: the events of one call (same ``Freshrec-Received-Us``)
are judged against one answer, computed from the history before the first of them, and each
later call's events against the history that includes the earlier calls. Events without a call
marker are each their own call (a request before every event).

These functions build those requests and rank the targets among the candidates exactly as the
exported towers would: the vector is the last position of the user tower over the window, the
score a dot product with the item table, ties at their expected rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from services.trainer.evaluation import rank_metrics
from services.trainer.model import PAD, TwoTower

#: A history entry: item row, event type, context rows.
Entry = tuple[int, int, tuple[int, ...]]


@dataclass
class Queries:
    """Requests [Q] and the targets [T] each is judged on."""

    inputs: np.ndarray  # [Q, L] item rows, oldest first, left-padded
    types: np.ndarray  # [Q, L] event types aligned with inputs
    users: np.ndarray  # [Q] user rows (0: none)
    contexts: np.ndarray | None  # [Q, K] context rows of the request (its first event's)
    query: np.ndarray  # [T] the request of each target
    target: np.ndarray  # [T] item row, PAD where the item was no candidate (a miss)
    excluded: np.ndarray  # [E, 2] (request, item row) pairs its answer leaves out
    history: np.ndarray  # [T] items the user had touched before the request
    sequence: np.ndarray  # [T] the stream sequence of each target's event (0: unknown)
    #: The same requests as positions in shared per-user sequences (one user tower pass gives the
    #: vectors of all of a user's requests, each reading exactly its window): rows [R, S] with a
    #: leading PAD, their types and users, and each request's (row, position).
    shared: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def n_targets(self) -> int:
        return int(len(self.target))


@dataclass
class QueryBuilder:
    max_history: int
    max_context: int
    rows: list[tuple[list[int], list[int], int, tuple[int, ...]]] = field(default_factory=list)
    query: list[int] = field(default_factory=list)
    target: list[int] = field(default_factory=list)
    history: list[int] = field(default_factory=list)
    sequence: list[int] = field(default_factory=list)
    excluded: list[np.ndarray] = field(default_factory=list)
    #: Shared rows: (items, types, user, start) per row, and (row, position) per request.
    chains: list[tuple[list[int], list[int], int]] = field(default_factory=list)
    places: list[tuple[int, int]] = field(default_factory=list)

    def add(
        self,
        window: Sequence[Entry],
        user: int,
        context: tuple[int, ...],
        targets: Sequence[int],
        excluded: np.ndarray,
        touched: int,
        sequences: Sequence[int] = (),
        after: Sequence[Entry] | None = None,
    ) -> None:
        """One request: the history window before it, and the item rows it is judged on.

        ``after`` continues the user's previous request: the entries between its cut and this one's
        (so both are positions of one shared row); None starts a new row at this window."""
        q = len(self.rows)
        window = list(window)[-self.max_history :]
        if after is None or not self.chains or len(self.chains[-1][0]) + len(after) > 2 * self.max_history:
            self.chains.append(([PAD, *(e[0] for e in window)], [0, *(e[1] for e in window)], user))
        else:
            items, kinds, _ = self.chains[-1]
            items += [e[0] for e in after]
            kinds += [e[1] for e in after]
        self.places.append((len(self.chains) - 1, len(self.chains[-1][0]) - 1))
        self.rows.append(([e[0] for e in window], [e[1] for e in window], user, context))
        self.query += [q] * len(targets)
        self.target += list(targets)
        self.history += [touched] * len(targets)
        self.sequence += list(sequences) if sequences else [0] * len(targets)
        rows = np.asarray(excluded, dtype=np.int64)
        if len(rows):
            self.excluded.append(np.stack([np.full(len(rows), q, dtype=np.int64), rows], 1))

    def build(self) -> Queries:
        n, length, k = len(self.rows), self.max_history, self.max_context
        inputs = np.zeros((n, length), dtype=np.int64)
        types = np.zeros((n, length), dtype=np.int64)
        users = np.zeros(n, dtype=np.int64)
        contexts = np.zeros((n, k), dtype=np.int64) if k else None
        for q, (items, kinds, user, context) in enumerate(self.rows):
            if items:
                inputs[q, length - len(items) :] = items
                types[q, length - len(items) :] = kinds
            users[q] = user
            if contexts is not None and context:
                contexts[q, : min(k, len(context))] = context[:k]
        excluded = np.concatenate(self.excluded) if self.excluded else np.zeros((0, 2), dtype=np.int64)
        width = max((len(c[0]) for c in self.chains), default=1)
        rows = np.zeros((len(self.chains), width), dtype=np.int64)
        row_types = np.zeros((len(self.chains), width), dtype=np.int64)
        row_users = np.zeros(len(self.chains), dtype=np.int64)
        for r, (items, kinds, user) in enumerate(self.chains):
            rows[r, width - len(items) :] = items
            row_types[r, width - len(items) :] = kinds
            row_users[r] = user
        place = np.asarray(self.places, dtype=np.int64).reshape(-1, 2)
        offsets = width - np.array([len(c[0]) for c in self.chains], dtype=np.int64)
        shared = (rows, row_types, row_users, place[:, 0], place[:, 1] + offsets[place[:, 0]])
        return Queries(
            inputs,
            types,
            users,
            contexts,
            np.asarray(self.query, dtype=np.int64),
            np.asarray(self.target, dtype=np.int64),
            excluded,
            np.asarray(self.history, dtype=np.int64),
            np.asarray(self.sequence, dtype=np.int64),
            shared if self.max_context == 0 else None,
        )


def compact(inputs: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Windows without the items a model does not know (as inference skips them), left-padded."""
    keep = (inputs > 0) & known[inputs]
    order = np.argsort(keep, axis=1, kind="stable")  # unknown first, known in their order
    out = np.take_along_axis(inputs, order, axis=1)
    return np.where(np.take_along_axis(keep, order, axis=1), out, 0)


@torch.no_grad()
def user_vectors(
    model: TwoTower, table: torch.Tensor, queries: Queries, inputs: np.ndarray | None = None
) -> torch.Tensor:
    """The user tower's output for each request: [Q, D] (what the exported graph computes).

    Without other ``inputs`` (windows a shadow compacted) the shared per-user rows are encoded:
    one pass per user, each request read at its position."""
    model.eval()
    if inputs is None and queries.shared is not None:
        rows, kinds, row_users, row_of, position = queries.shared
        width = rows.shape[1]
        outputs = width - int(position.min()) if len(position) else 1
        users = torch.from_numpy(row_users)
        users = torch.where(users < model.user_ids.num_embeddings, users, torch.zeros_like(users))
        h = model.encode(table, torch.from_numpy(rows), users, torch.from_numpy(kinds), None, outputs=outputs)
        model.train()
        return h[torch.from_numpy(row_of), torch.from_numpy(position - (width - outputs))]
    history = torch.from_numpy(queries.inputs if inputs is None else inputs)
    users = torch.from_numpy(queries.users)
    users = torch.where(users < model.user_ids.num_embeddings, users, torch.zeros_like(users))
    types = torch.from_numpy(queries.types)
    context = None if queries.contexts is None else torch.from_numpy(queries.contexts)
    vectors = model.encode(table, history, users, types, context, outputs=1)[:, -1]
    model.train()
    return vectors


@torch.no_grad()
def rank_targets(
    vectors: torch.Tensor, table: torch.Tensor, candidates: torch.Tensor, queries: Queries
) -> tuple[torch.Tensor, torch.Tensor]:
    """HR@10 and NDCG@10 of every target among the candidates, its request's exclusions left out."""
    return _rank(vectors @ table.T, candidates, queries)


@torch.no_grad()
def rank_scores(
    scores: torch.Tensor, candidates: torch.Tensor, queries: Queries
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rank_targets`` for one score per item shared by every request (popularity) [N]."""
    n = min(len(scores), len(candidates))
    full = torch.zeros(len(candidates), dtype=torch.float64)
    full[:n] = scores[:n].to(torch.float64)
    return _rank(full.expand(len(queries.users), -1).clone(), candidates, queries)


@torch.no_grad()
def rank_table(
    scores: torch.Tensor, candidates: torch.Tensor, queries: Queries
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rank_targets`` for given scores per request [Q, N] (follow-ups)."""
    full = torch.full((len(queries.users), len(candidates)), -math.inf, dtype=torch.float64)
    n = min(scores.shape[1], len(candidates))
    full[:, :n] = scores[:, :n].to(torch.float64)
    return _rank(full, candidates, queries)


def subset(queries: Queries, targets: np.ndarray) -> Queries:
    """The given targets (indices) with only the requests they belong to, renumbered."""
    used, query = np.unique(queries.query[targets], return_inverse=True)
    renumber = np.full(len(queries.users), -1, dtype=np.int64)
    renumber[used] = np.arange(len(used))
    excluded = queries.excluded
    if len(excluded):
        excluded = excluded[renumber[excluded[:, 0]] >= 0]
        excluded = np.stack([renumber[excluded[:, 0]], excluded[:, 1]], 1)
    return Queries(
        queries.inputs[used],
        queries.types[used],
        queries.users[used],
        None if queries.contexts is None else queries.contexts[used],
        query.astype(np.int64),
        queries.target[targets],
        excluded,
        queries.history[targets],
        queries.sequence[targets],
    )


def _rank(
    scores: torch.Tensor, candidates: torch.Tensor, queries: Queries
) -> tuple[torch.Tensor, torch.Tensor]:
    scores.masked_fill_(~candidates[: scores.shape[1]], -math.inf)
    scores[:, PAD] = -math.inf
    if len(queries.excluded):
        e = torch.from_numpy(queries.excluded)
        scores[e[:, 0], e[:, 1]] = -math.inf
    per_target = scores[torch.from_numpy(queries.query)]
    return rank_metrics(per_target, torch.from_numpy(queries.target))
