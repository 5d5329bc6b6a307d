"""Learning from the event stream: each micro-batch is scored first (prequential), then learned.

One learner serves all three update schedules (see ``schedules.py``): ``observe`` scores a
micro-batch with the current weights, then folds it into the state (id maps, histories,
replay buffer, stream position) and returns its training sequences; ``train_step`` takes one
online step on them mixed with replayed older events; ``fit`` runs epochs over many sequences
(pre-training, incremental windows, periodic retraining). Every call happens on one thread at
a time (the trainer's loop calls it through ``asyncio.to_thread``), so training, export and
checkpointing never overlap.

Training sequences ("chunks") are exact: the vector that predicts an event reads the same
window of at most L earlier items that the exported user tower reads when serving, so the
prequential figures measure what inference would have answered.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from freshrec.v1 import event_pb2, item_pb2
from services.trainer.evaluation import Paired, Running, rank_metrics
from services.trainer.model import PAD, IdMap, ModelConfig, TwoTower
from services.trainer.policy import (
    FOLLOW_UP,
    FOLLOW_UP_BACKOFF,
    MODEL,
    POPULAR,
    FollowUps,
    Policy,
    Popularity,
    follow_up_scores,
    ranker_of,
    segment_of,
)
from services.trainer.replay import ChunkBuilder, Chunks, ReplayBuffer, UserSequence
from services.trainer.scoring import (
    Entry,
    Queries,
    QueryBuilder,
    compact,
    rank_scores,
    rank_table,
    rank_targets,
    subset,
    user_vectors,
)
from services.trainer.signals import Interaction, Signals
from services.trainer.softmax import IGNORED, softmax_losses
from services.trainer.versions import Shadow
from shared.preprocessing import PreprocessingSettings

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class LearnerConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    learning_rate: float = 1e-3
    batch_size: int = 128
    replay_size: int = 2_000
    replay_ratio: float = 0.5
    #: Loss weight of a replayed target relative to a new one: many lightly weighted replayed
    #: targets anchor the model as strongly as a few heavy ones, with less noise.
    replay_weight: float = 1.0
    online_steps: int = 1
    #: Learning rate of online steps (None: ``learning_rate``) and the share of it dense layers get.
    online_learning_rate: float | None = None
    online_dense_scale: float = 1.0
    #: Adam's beta1 in online steps (0: each step follows its own micro-batch's gradient).
    online_momentum: float = 0.9
    #: The served weights (scored, exported) are an exponential moving average of the trained
    #: ones with this decay per online step (0: the trained weights are served).
    average_decay: float = 0.0
    #: Item rows with fewer interactions than this serve their trained id embedding as it is
    #: (a new item has no past worth averaging).
    average_min_count: int = 10
    full_softmax_max_items: int = 20_000
    sampled_negatives: int = 2048
    min_item_count: int = 1
    min_user_count: int = 1
    row_ttl_s: float = 0.0
    id_dropout: float = 0.0
    recent_window: int = 2000
    max_grad_norm: float = 5.0
    preprocessing: PreprocessingSettings = field(default_factory=PreprocessingSettings)
    seed: int = 0


@dataclass
class Position:
    """How far through the streams the learner's state is."""

    stream_sequence: int = 0
    event_time: float = 0.0
    events_learned: int = 0
    catalogue_sequence: int = 0


@dataclass
class Observation:
    """What one micro-batch brought: its training chunks and how many events were new."""

    chunks: Chunks | None
    events: int
    evaluated: int = 0


class Learner:
    def __init__(self, config: LearnerConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        m = config.model
        #: The served weights: scored, exported, snapshotted.
        self.model = TwoTower(m)
        #: The weights gradient steps move; with ``average_decay`` a separate copy whose moving
        #: average is ``model``, else ``model`` itself.
        self.trained = self._trained_copy()
        self.optimizer = self._new_optimizer()
        self.items = IdMap()
        self.item_counts = np.zeros(1024, dtype=np.int64)
        self.users = IdMap()
        self.pending_users: dict[str, int] = {}
        self.categories = IdMap()
        self.tags = IdMap()
        self.contexts = IdMap()
        self.histories: dict[str, deque[Entry]] = {}
        self.seen: dict[str, set[int]] = {}
        self.user_seen_at: dict[str, float] = {}
        #: Per user: the stream sequence of their newest event (what retention judges by).
        self.user_last_sequence: dict[str, int] = {}
        #: Items deleted from the catalogue: their events are dropped (an upsert brings one back).
        self.deleted_items: set[str] = set()
        #: Per user: weights of the newest items not yet offered to the replay reservoir.
        self.replay_waiting: dict[str, list[float]] = {}
        self.replay = ReplayBuffer(config.replay_size, m.max_history, m.max_context)
        self.signals = Signals(config.preprocessing, m.max_context)
        self.position = Position()
        self.prequential = Running(window=config.recent_window)
        #: What inference answered: the live version's figures on every event since it was first
        #: scored (across versions), as its export serves them.
        self.served = Running(window=config.recent_window)
        #: Item popularity decayed over events, and which ranker wins per segment (``policy.py``).
        self.popularity = Popularity()
        self.follow_ups = FollowUps()
        #: The follow-up table the policy scores with, and the events learned when it was made.
        self._follow_table: tuple[np.ndarray, np.ndarray] | None = None
        self._follow_table_at = -1
        self.policy = Policy(window=config.recent_window)
        #: (stream sequence, HR@10, NDCG@10) of the recent events as the live version served them
        #: (NDCG@10 tells the rank): what a client's own measurement can be held against.
        self.served_events: deque[tuple[int, float, float]] = deque(maxlen=config.recent_window)
        #: The learner against the live version, on events since the last export (the gate).
        self.gate = Paired()
        #: The live version against its parent, on events since it went live (rollback watch).
        self.watch = Paired()
        self.shadows: dict[str, Shadow] = {}
        #: The shadows' own prequential figures on the events they scored (since they were made).
        self.shadow_figures: dict[str, Running] = {}
        self.skipped_steps = 0

    def _new_optimizer(self) -> torch.optim.Optimizer:
        """Adam with two groups: the sparse tables (ids, content vocabularies) and the dense layers,
        so online steps can move them at different rates (Monolith-style)."""
        sparse_names = {"item_ids", "user_ids", "categories", "tags", "contexts", "event_types"}
        sparse: list[torch.nn.Parameter] = []
        dense: list[torch.nn.Parameter] = []
        for name, param in self.trained.named_parameters():
            (sparse if name.split(".")[0] in sparse_names else dense).append(param)
        lr = self.config.learning_rate
        # fused: one kernel for every parameter (a quarter of the per-tensor loop's time on CPU)
        return torch.optim.Adam(
            [{"params": sparse, "lr": lr}, {"params": dense, "lr": lr}], lr=lr, fused=True
        )

    def _set_learning_rate(
        self, learning_rate: float, dense_scale: float = 1.0, momentum: float | None = None
    ) -> None:
        sparse, dense = self.optimizer.param_groups
        sparse["lr"] = learning_rate
        dense["lr"] = learning_rate * dense_scale
        for group in (sparse, dense):
            group["betas"] = (0.9 if momentum is None else momentum, group["betas"][1])

    # -- served and trained weights ----------------------------------------------------------
    @property
    def averaging(self) -> bool:
        return self.trained is not self.model

    def _trained_copy(self) -> TwoTower:
        """The weights to train: a copy of the served ones when they are averaged (buffers shared)."""
        if not self.config.average_decay:
            return self.model
        trained = copy.deepcopy(self.model)
        self._share_buffers(trained)
        return trained

    def _share_buffers(self, trained: TwoTower) -> None:
        """Per-item buffers (learned flags, content features) are one tensor for both copies."""
        for name in ("item_learned", "item_categories", "item_tags", "item_text"):
            setattr(trained, name, getattr(self.model, name))

    def _reset_average(self) -> None:
        """The served weights become the trained ones (after a fit, a rebase, a restore)."""
        if self.averaging:
            self.model.load_state_dict(self.trained.state_dict())

    @torch.no_grad()
    def _update_average(self) -> None:
        """One moving-average step of the served weights towards the trained ones."""
        trained = dict(self.trained.named_parameters())
        served = list(self.model.named_parameters())
        torch._foreach_lerp_(
            [p for _, p in served], [trained[name] for name, _ in served], 1.0 - self.config.average_decay
        )
        n = self.model.item_ids.num_embeddings
        counts = self.item_counts[: min(n, len(self.item_counts))]
        young = torch.from_numpy(np.flatnonzero(counts < self.config.average_min_count))
        self.model.item_ids.weight[young] = self.trained.item_ids.weight[young]

    @property
    def max_history(self) -> int:
        return self.config.model.max_history

    # -- the stream ------------------------------------------------------------------------
    def learn(self, batch: Sequence[tuple[int, event_pb2.Event]]) -> int:
        """Scores, then learns from, the events after the current position; returns how many."""
        return self.observe(batch, train=True).events

    def observe(
        self,
        batch: Sequence[tuple[int, event_pb2.Event]],
        evaluate: bool = True,
        train: bool = False,
        calls: Sequence[int] | None = None,
    ) -> Observation:
        """Scores the events after the current position, folds them in, optionally learns them.

        ``calls`` (aligned with ``batch``) marks the producer call each event came in (its
        ``Freshrec-Received-Us``; 0 unknown): a user's events of one call are scored against one
        answer, as inference gave it before the call (``scoring.py``)."""
        fresh = [(seq, e) for seq, e in batch if seq > self.position.stream_sequence]
        if not fresh:
            return Observation(None, 0)
        interactions = self.signals.interactions(fresh)
        if calls is not None:
            call_of = {seq: call for (seq, _), call in zip(batch, calls, strict=True) if call}
            interactions = [replace(it, call=call_of.get(it.sequence, 0)) for it in interactions]
        observation = self.observe_interactions(interactions, evaluate, train)
        p = self.position
        p.stream_sequence = fresh[-1][0]
        p.events_learned += len(fresh) - observation.events  # repeats and bots count as consumed
        p.event_time = max(
            [p.event_time, *(e.occurred_at.seconds + e.occurred_at.nanos / 1e9 for _, e in fresh)]
        )
        return Observation(observation.chunks, len(fresh), observation.evaluated)

    def observe_interactions(
        self, interactions: Sequence[Interaction], evaluate: bool = True, train: bool = False
    ) -> Observation:
        """Scores new events with the current weights, folds them into the state and, with
        ``train``, takes an online step on them mixed with replayed chunks.

        Scores and step share one forward pass without dropout; the scores are read before the
        step changes anything, so every event is predicted before it is learned.
        """
        interactions = list(self._not_deleted(interactions))
        p = self.position
        rows_before = self.items.capacity_needed
        free_before = list(self.items.free)
        new_rows: set[int] = set()
        by_user: dict[str, list[tuple[Interaction, Entry]]] = {}
        negatives: list[tuple[str, int]] = []
        for it in interactions:
            p.event_time = max(p.event_time, it.time)
            self.user_seen_at[it.user_id] = max(self.user_seen_at.get(it.user_id, 0.0), it.time)
            self.user_last_sequence[it.user_id] = max(self.user_last_sequence.get(it.user_id, 0), it.sequence)
            if it.item_id not in self.items.rows:
                new_rows.add(self.items.add(it.item_id, it.time))
            else:
                self.items.add(it.item_id, it.time)
            row = self.items.rows[it.item_id]
            if not it.positive:
                negatives.append((it.user_id, row))
                continue
            entry = (row, it.type, tuple(self.contexts.add(c) for c in it.context))
            by_user.setdefault(it.user_id, []).append((it, entry))
        self._ensure_capacity()
        # Inference knows a user's id row only if the user was learned before this batch.
        users_before = {u for u in by_user if u in self.users.rows}
        # Counts (frequency filter) and user admission come first: a new item learns at once.
        learned: list[int] = []
        for user_id, new in by_user.items():
            for _, entry in new:
                row = entry[0]
                self.item_counts[row] += 1
                if self.item_counts[row] >= self.config.min_item_count:
                    learned.append(row)
            count = self.pending_users.get(user_id, 0) + len(new)
            if user_id in self.users.rows or count >= self.config.min_user_count:
                self.pending_users.pop(user_id, None)
                self.users.add(user_id, new[-1][0].time)
            else:
                self.pending_users[user_id] = count
        self._ensure_capacity()
        self.model.item_learned[learned] = 1.0

        builder = ChunkBuilder(self.max_history, self.config.model.max_context)
        sequences: dict[str, list[Entry]] = {}
        for user_id, new in by_user.items():
            old = list(self.histories.get(user_id, ()))
            seq = old + [entry for _, entry in new]
            sequences[user_id] = seq
            builder.add(
                seq,
                len(old),
                [it.weight for it, _ in new],
                self.users.get(user_id),
                [it.sequence for it, _ in new],
            )
        chunks = builder.build() if builder.rows else None
        evaluated = 0
        if chunks is not None and evaluate:
            candidates = torch.zeros(self.items.capacity_needed, dtype=torch.bool)
            candidates[1:rows_before] = True
            gone = [r for r in free_before if r < rows_before] + [r for r in new_rows if r < rows_before]
            candidates[gone] = False
            evaluated = self._record(self._queries(by_user, sequences, candidates, users_before), candidates)
        if chunks is not None and train:
            self.train_step(chunks)
        # A user's items join the replay reservoir half a window at a time, as pre-training chunks
        # (each position a target): a replayed target then costs about one position, where the
        # micro-batch's own chunks (a full window of context for a few targets) cost a window.
        dense = ChunkBuilder(self.max_history, self.config.model.max_context, context=1)
        stride = max(1, self.max_history // 2)
        for user_id, new in by_user.items():
            seq = sequences[user_id]
            self.histories[user_id] = deque(seq[-self.max_history :], maxlen=self.max_history)
            self.seen.setdefault(user_id, set()).update(e[0] for e in seq[len(seq) - len(new) :])
            waiting = self.replay_waiting.setdefault(user_id, [])
            waiting += [it.weight for it, _ in new]
            if len(waiting) >= stride:
                k = min(len(waiting), len(seq))
                dense.add(seq, len(seq) - k, waiting[-k:], self.users.get(user_id))
                del self.replay_waiting[user_id]
        if dense.rows:
            self.replay.offer(self.rng, dense.build())
        self._count_popularity(it for new in by_user.values() for it, _ in new)
        self.follow_ups.add(
            (sequences[u][k - 1][0], sequences[u][k][0])
            for u, new in by_user.items()
            for k in range(max(1, len(sequences[u]) - len(new)), len(sequences[u]))
        )
        self._note_negatives(negatives)
        p.events_learned += len(interactions)
        return Observation(chunks, len(interactions), evaluated)

    def _count_popularity(self, interactions: Iterable[Interaction]) -> None:
        """Positive interactions into the decayed popularity, in stream order."""
        positive = sorted((it for it in interactions if it.positive), key=lambda it: it.sequence)
        if positive:
            rows = np.array([self.items.rows[it.item_id] for it in positive], dtype=np.int64)
            self.popularity.add(rows, np.array([it.weight for it in positive], dtype=np.float64))

    def _note_negatives(self, negatives: list[tuple[str, int]]) -> None:
        """A disliked item is never recommended back, but it is not learned as a positive."""
        for user_id, row in negatives:
            self.seen.setdefault(user_id, set()).add(row)

    def _queries(
        self,
        by_user: dict[str, list[tuple[Interaction, Entry]]],
        sequences: dict[str, list[Entry]],
        candidates: torch.Tensor,
        users_before: set[str],
    ) -> Queries:
        """The requests the micro-batch's events answer (see ``scoring.py``): per user, one per run of
        events from one producer call, reading the history before the run."""
        builder = QueryBuilder(self.max_history, self.config.model.max_context)
        candidate = candidates.numpy()
        for user_id, new in by_user.items():
            seq = sequences[user_id]
            first = len(seq) - len(new)
            seen = self.seen.get(user_id, ())
            before = np.fromiter(seen, dtype=np.int64, count=len(seen))
            user_row = self.users.get(user_id) if user_id in users_before else 0
            j, previous = 0, -1
            while j < len(new):
                call = new[j][0].call
                end = j + 1
                while end < len(new) and call and new[end][0].call == call:
                    end += 1
                cut = first + j
                excluded = np.concatenate([before, [e[0] for e in seq[first:cut]]]) if j else before
                targets = [row if candidate[row] else PAD for row in (e[0] for _, e in new[j:end])]
                context = new[j][1][2]
                builder.add(
                    seq[max(0, cut - self.max_history) : cut],
                    user_row,
                    context,
                    targets,
                    excluded,
                    cut,
                    [it.sequence for it, _ in new[j:end]],
                    after=seq[previous:cut] if previous >= 0 else None,
                )
                previous = cut
                j = end
        return builder.build()

    @torch.no_grad()
    def _record(self, queries: Queries, candidates: torch.Tensor) -> int:
        """Prequential HR@10/NDCG@10 of the learner and of the shadows on the same requests; the
        popularity rankers on a sample of them (for the policy); what the live version served."""
        if not queries.n_targets:
            return 0
        table = self.item_table()
        hr, ndcg = rank_targets(user_vectors(self.model, table, queries), table, candidates, queries)
        self.prequential.add(hr, ndcg)
        segments = segment_of(queries.history)
        self.policy.record(segments, MODEL, hr.numpy())
        self._record_popularity(queries, candidates, segments)
        live = self.shadows.get("live")
        if live is None:
            return queries.n_targets
        live_hr, live_ndcg = self._shadow_scores(live, queries, candidates)
        self.gate.add(hr, live_hr)
        self.shadow_figures.setdefault("live", Running(self.config.recent_window)).add(live_hr, live_ndcg)
        served_hr, served_ndcg = self._served(live, queries, candidates, live_hr, live_ndcg)
        self.served.add(served_hr, served_ndcg)
        self.served_events.extend(
            zip(queries.sequence.tolist(), served_hr.tolist(), served_ndcg.tolist(), strict=True)
        )
        parent = self.shadows.get("parent")
        if parent is not None:
            parent_hr, parent_ndcg = self._shadow_scores(parent, queries, candidates)
            self.watch.add(live_hr, parent_hr)
            self.shadow_figures.setdefault("parent", Running(self.config.recent_window)).add(
                parent_hr, parent_ndcg
            )
        return queries.n_targets

    #: Scores the popularity rankers compute per micro-batch and column (targets x items).
    POPULARITY_BUDGET = 1 << 16

    def _record_popularity(self, queries: Queries, candidates: torch.Tensor, segments: np.ndarray) -> None:
        n = candidates.shape[0]
        size = max(8, self.POPULARITY_BUDGET // max(n, 1))
        picked = np.arange(queries.n_targets)
        if len(picked) > size:
            picked = np.sort(self.rng.choice(len(picked), size=size, replace=False))
        sub = subset(queries, picked)
        columns = self.popularity.columns(n)
        for h, ranker in enumerate(POPULAR):
            hr, _ = rank_scores(torch.from_numpy(columns[:, h]), candidates, sub)
            self.policy.record(segments[picked], ranker, hr.numpy())
        items, counts = self.follow_up_table()
        scores = follow_up_scores(items, counts, sub.inputs[:, -1], columns[:, FOLLOW_UP_BACKOFF])
        hr, _ = rank_table(torch.from_numpy(scores), candidates, sub)
        self.policy.record(segments[picked], FOLLOW_UP, hr.numpy())

    def follow_up_table(self) -> tuple[np.ndarray, np.ndarray]:
        """The follow-up table as an export would hold it (remade every 10,000 learned events)."""
        learned = self.position.events_learned
        if self._follow_table is None or learned - self._follow_table_at >= 10_000:
            self._follow_table = self.follow_ups.table(self.items.capacity_needed)
            self._follow_table_at = learned
        return self._follow_table

    def _served(
        self,
        live: Shadow,
        queries: Queries,
        candidates: torch.Tensor,
        model_hr: torch.Tensor,
        model_ndcg: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What inference answered with the live version: its policy picks, per request, the model
        or one of the popularity columns it was exported with."""
        if live.popularity is None or not live.policy:
            return model_hr, model_ndcg
        hr, ndcg = model_hr.clone(), model_ndcg.clone()
        rankers = np.asarray(ranker_of(live.policy, queries.history))
        n = candidates.shape[0]
        known = torch.zeros(n, dtype=torch.bool)
        m = min(n, len(live.known))
        known[:m] = live.known[:m]
        columns = np.zeros((n, live.popularity.shape[1]))
        columns[: min(n, len(live.popularity))] = live.popularity[:n]
        for ranker in (*POPULAR, FOLLOW_UP):
            picked = np.flatnonzero(rankers == ranker)
            if not len(picked):
                continue
            sub = subset(queries, picked)
            sub = replace(sub, target=np.where(known.numpy()[sub.target], sub.target, PAD))
            if ranker == FOLLOW_UP and live.follow_ups is not None:
                last = compact(sub.inputs, known.numpy())[:, -1]
                items, counts = live.follow_ups
                scores = follow_up_scores(items, counts, last, columns[:, FOLLOW_UP_BACKOFF])
                p_hr, p_ndcg = rank_table(torch.from_numpy(scores), candidates & known, sub)
            else:
                h = POPULAR.index(ranker) if ranker in POPULAR else FOLLOW_UP_BACKOFF
                p_hr, p_ndcg = rank_scores(torch.from_numpy(columns[:, h]), candidates & known, sub)
            hr[torch.from_numpy(picked)] = p_hr
            ndcg[torch.from_numpy(picked)] = p_ndcg
        return hr, ndcg

    def _shadow_scores(
        self, shadow: Shadow, queries: Queries, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A shadow's HR@10 and NDCG@10 as its export serves: items it never knew are no
        candidates, and histories skip them."""
        n = candidates.shape[0]
        known = torch.zeros(n, dtype=torch.bool)
        table = torch.zeros(n, shadow.table.shape[1])
        m = min(n, shadow.table.shape[0])
        known[:m] = shadow.known[:m]
        table[:m] = shadow.table[:m]
        inputs = compact(queries.inputs, known.numpy())
        target = np.where(known.numpy()[queries.target], queries.target, PAD)
        mine = replace(queries, target=target)
        # Windows the shadow knows whole are read from the shared rows (one pass per user).
        windows = None if np.array_equal(inputs, queries.inputs) else inputs
        return rank_targets(user_vectors(shadow.model, table, mine, windows), table, candidates & known, mine)

    def _encode(
        self,
        model: TwoTower,
        table: torch.Tensor,
        chunks: Chunks,
        inputs: torch.Tensor,
        outputs: int | None = None,
    ) -> torch.Tensor:
        users = torch.from_numpy(chunks.users)
        return model.encode(
            table,
            inputs,
            torch.where(users < model.user_ids.num_embeddings, users, torch.zeros_like(users)),
            torch.from_numpy(chunks.types),
            None if chunks.contexts is None else torch.from_numpy(chunks.contexts),
            outputs,
        )

    # -- gradient steps --------------------------------------------------------------------
    def train_step(self, chunks: Chunks) -> None:
        """One online update on observed chunks mixed with replayed ones (at the online learning
        rate and momentum), then one step of the served weights' moving average."""
        c = self.config
        replayed = self._replayed(chunks.n_targets, c.replay_ratio)
        self._set_learning_rate(
            c.online_learning_rate or c.learning_rate, c.online_dense_scale, c.online_momentum
        )
        try:
            self._step_parts([chunks] if replayed is None else [chunks, replayed])
            batch = chunks if replayed is None else Chunks.concat([chunks, replayed])
            for _ in range(c.online_steps - 1):
                self._step(batch, dropout=False)
        finally:
            self._set_learning_rate(c.learning_rate)
        if self.averaging:
            self._update_average()

    def _replayed(self, n_targets: int, ratio: float) -> Chunks | None:
        """Replayed chunks for an update on ``n_targets`` new targets, weighted ``replay_weight``."""
        replayed = self.replay.sample(self.rng, int(round(n_targets * ratio)))
        if replayed is not None and self.config.replay_weight != 1.0:
            replayed.weights = replayed.weights * np.float32(self.config.replay_weight)
        return replayed

    def fit(
        self,
        chunks: Chunks,
        epochs: int,
        learning_rate: float | None = None,
        replay_ratio: float = 0.0,
        progress: Progress | None = None,
    ) -> None:
        """Epochs of mini-batches over the chunks (pre-training, windows, retraining)."""
        if not len(chunks):
            return
        self._set_learning_rate(learning_rate or self.config.learning_rate)
        size = self.config.batch_size
        try:
            for epoch in range(epochs):
                order = self.rng.permutation(len(chunks))
                total = 0.0
                for start in range(0, len(order), size):
                    part = chunks.select(order[start : start + size])
                    if replay_ratio:
                        replayed = self._replayed(part.n_targets, replay_ratio)
                        if replayed is not None:
                            part = Chunks.concat([part, replayed])
                    total += self._step(part)
                self._reset_average()  # what is scored and served is where the epoch ended
                if progress is not None:
                    progress(epoch + 1, epochs, total)
        finally:
            self._set_learning_rate(self.config.learning_rate)
            self._reset_average()  # epochs end where they end: no average across them
            self.policy.forget(MODEL)  # another model now: its figures start again

    def fit_until_stale(
        self,
        chunks: Chunks,
        max_epochs: int,
        holdout: int,
        check_every: int = 2,
        patience: int = 3,
        progress: Progress | None = None,
    ) -> tuple[int, float, Paired | None]:
        """Epochs over all but ``holdout`` held-out targets (the last event of as many users) while
        their HR@10 keeps improving (at most ``max_epochs``, checked every ``check_every``); the best
        weights are kept, compared with the live version on the held-out targets, then those are
        learned once too.

        Returns (epochs kept, held-out HR@10 then, the comparison or None). How many epochs a log
        needs depends on the log, so the held-out newest events decide it, never a fixed count.
        """
        if holdout <= 0 or chunks.sequences is None:
            self.fit(chunks, max_epochs, progress=progress)
            return max_epochs, float("nan"), None
        older, newest = chunks.split_last_of_users(holdout, self.rng)
        best_hr, best_epoch, stale, done = -1.0, 0, 0, 0
        best: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        while done < max_epochs and stale < patience:
            n = min(check_every, max_epochs - done)
            self.fit(older, n)
            done += n
            hr = float(self.window_scores(self.model, self.item_table(), newest)[0].mean())
            if progress is not None:
                progress(done, max_epochs, hr)
            if hr > best_hr:
                best_hr, best_epoch, stale = hr, done, 0
                best = (
                    {k: v.clone() for k, v in self.trained.state_dict().items()},
                    copy.deepcopy(self.optimizer.state_dict()),
                )
            else:
                stale += 1
        if best is not None and best_epoch != done:
            self.trained.load_state_dict(best[0])
            self.optimizer.load_state_dict(best[1])
            self._reset_average()
        paired = self.compare_with_live(newest)
        held_out = self._held_out_figures(newest)
        self.fit(newest, 1, replay_ratio=self.config.replay_ratio)
        for ranker, (segments, hits) in held_out.items():  # the new model's first figures
            self.policy.record(segments, ranker, hits)
        return best_epoch, best_hr, paired

    @torch.no_grad()
    def _held_out_figures(self, held: Chunks) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every ranker's hits on held-out targets, by segment: what the policy knows of a model
        fresh from a fit before the stream measures it. Each target is a request reading the items
        before it in its chunk (those left out of its answer); follow-ups are counted without the
        held-out pairs themselves."""
        c, p = np.nonzero(held.targets > 0)
        if not len(c):
            return {}
        length = self.max_history
        builder = QueryBuilder(length, 0)
        pairs = []
        for chunk, position in zip(c.tolist(), p.tolist(), strict=True):
            window = [int(r) for r in held.inputs[chunk, max(0, position - length + 1) : position + 1] if r]
            builder.add(
                [(r, 0, ()) for r in window],
                0,
                (),
                [int(held.targets[chunk, position])],
                np.array(window),
                len(window),
            )
            if window:
                pairs.append((window[-1], int(held.targets[chunk, position])))
        queries = builder.build()
        candidates = torch.zeros(self.items.capacity_needed, dtype=torch.bool)
        candidates[1:] = torch.from_numpy(self.item_counts[1 : self.items.capacity_needed] > 0)
        segments = segment_of(queries.history)
        table = self.item_table()
        out = {
            MODEL: (
                segments,
                rank_targets(user_vectors(self.model, table, queries), table, candidates, queries)[0].numpy(),
            )
        }
        columns = self.popularity.columns(len(candidates))
        for h, ranker in enumerate(POPULAR):
            out[ranker] = (
                segments,
                rank_scores(torch.from_numpy(columns[:, h]), candidates, queries)[0].numpy(),
            )
        self.follow_ups.add(pairs, -1.0)
        items, counts = self.follow_ups.table(len(candidates))
        self.follow_ups.add(pairs)
        scores = follow_up_scores(items, counts, queries.inputs[:, -1], columns[:, FOLLOW_UP_BACKOFF])
        out[FOLLOW_UP] = (segments, rank_table(torch.from_numpy(scores), candidates, queries)[0].numpy())
        return out

    def _step(self, chunks: Chunks, dropout: bool = True) -> float:
        model = self.trained
        model.train(dropout)
        n_rows = self.items.capacity_needed
        keep = None
        if dropout and self.config.id_dropout:
            keep = (torch.rand(n_rows) >= self.config.id_dropout).float()
        if not (chunks.targets > 0).any():
            return 0.0
        table = model.item_vectors(n_rows, keep)
        h = self._encode(model, table, chunks, torch.from_numpy(chunks.inputs))
        loss = self._apply_loss(h, table, chunks)
        model.train()
        return loss

    def _step_parts(self, parts: Sequence[Chunks]) -> float:
        """One step (no dropout) on chunks encoded in groups of similar width: the same loss as
        ``_step`` on their concatenation, without encoding the padding a concatenation adds."""
        model = self.trained
        model.eval()
        table = model.item_vectors(self.items.capacity_needed)
        hs, wanted, weights = [], [], []
        for part in parts:
            used = (part.inputs > 0) | (part.targets > 0)
            width = np.where(used.any(1), part.inputs.shape[1] - used.argmax(1), 0)
            order = np.argsort(width, kind="stable")
            for group in np.array_split(order, 2 if len(order) > 8 else 1):
                w = int(width[group].max(initial=0))
                if not w:
                    continue
                sub = part.select(np.sort(group))
                sub = Chunks(
                    sub.inputs[:, -w:],
                    sub.types[:, -w:],
                    sub.targets[:, -w:],
                    sub.weights[:, -w:],
                    sub.users,
                    None if sub.contexts is None else sub.contexts[:, -w:],
                )
                # Only the columns from the first target on are computed (a new event's chunk
                # reads a window of context before its targets).
                outputs = sub.target_span() or w
                mask = torch.from_numpy(sub.targets[:, -outputs:] > 0)
                h = self._encode(model, table, sub, torch.from_numpy(sub.inputs), outputs)
                hs.append(h[mask])
                wanted.append(torch.from_numpy(sub.targets[:, -outputs:])[mask])
                weights.append(torch.from_numpy(sub.weights[:, -outputs:])[mask])
        loss = self._loss_step(table, torch.cat(hs), torch.cat(wanted), torch.cat(weights)) if hs else 0.0
        model.train()
        return loss

    def _apply_loss(self, h: torch.Tensor, table: torch.Tensor, chunks: Chunks) -> float:
        """Softmax loss at every target position, then one optimizer step."""
        targets = torch.from_numpy(chunks.targets)
        mask = targets > 0
        if not bool(mask.any()):
            return 0.0
        return self._loss_step(table, h[mask], targets[mask], torch.from_numpy(chunks.weights)[mask])

    def _loss_step(
        self, table: torch.Tensor, hs: torch.Tensor, wanted: torch.Tensor, weights: torch.Tensor
    ) -> float:
        """Softmax loss of the vectors ``hs`` predicting ``wanted`` (weighted), then one step.

        The softmax runs over the items anyone interacted with (columns of those rows only)."""
        if not len(wanted):
            return 0.0
        n_rows = table.shape[0]
        interacted = torch.from_numpy(self.item_counts[:n_rows] > 0)
        interacted[PAD] = False
        pool = torch.nonzero(interacted).squeeze(1)
        if not len(pool):
            return 0.0
        if len(pool) <= self.config.full_softmax_max_items:
            vectors, column = self._columns(table, pool)
            losses = softmax_losses(hs, vectors, column[wanted])
        else:
            losses = self._sampled_losses(hs, table, wanted, interacted)
        loss = (losses * weights).sum() / weights.sum().clamp(min=1e-6)
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            logger.warning("skipped a training step with a non-finite loss")
            return 0.0
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained.parameters(), self.config.max_grad_norm, foreach=True)
        self.optimizer.step()
        return float(loss.detach())

    @staticmethod
    def _columns(table: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool's item vectors and, per row of the table, its column among them (``IGNORED``
        for a row outside the pool)."""
        column = torch.full((table.shape[0],), IGNORED, dtype=torch.long)
        column[pool] = torch.arange(len(pool))
        first, last = int(pool[0]), int(pool[-1])
        if last - first + 1 == len(pool):  # contiguous rows: a view, no copy
            return table[first : last + 1], column
        return table.index_select(0, pool), column

    def _sampled_losses(
        self, h: torch.Tensor, table: torch.Tensor, wanted: torch.Tensor, interacted: torch.Tensor
    ) -> torch.Tensor:
        """Softmax over the batch's own targets plus uniformly drawn items (large catalogues)."""
        pool = torch.nonzero(interacted).squeeze(1)
        draws = torch.from_numpy(self.rng.integers(0, len(pool), size=self.config.sampled_negatives))
        candidates = torch.unique(torch.cat([wanted, pool[draws]]))
        logits = h @ table[candidates].T
        return F.cross_entropy(logits, torch.searchsorted(candidates, wanted), reduction="none")

    @torch.no_grad()
    def window_scores(
        self, model: TwoTower, table: torch.Tensor, chunks: Chunks
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expected HR@10 and NDCG@10 of every target of the chunks (items in its window excluded)."""
        model.eval()
        inputs = torch.from_numpy(chunks.inputs)
        n = table.shape[0]
        inputs = torch.where(inputs < n, inputs, torch.zeros_like(inputs))
        hrs, ndcgs = [], []
        length = self.max_history
        step = max(1, 8192 // max(chunks.inputs.shape[1], 1))
        for start in range(0, len(chunks), step):
            part = chunks.select(np.arange(start, min(start + step, len(chunks))))
            rows = inputs[start : start + step]
            h = self._encode(model, table, part, rows)
            where = torch.from_numpy(part.targets > 0)
            if not bool(where.any()):
                continue
            c, p = torch.nonzero(where, as_tuple=True)
            targets = torch.from_numpy(part.targets)[c, p]
            targets = torch.where(targets < n, targets, torch.zeros_like(targets))
            scores = h[c, p] @ table.T
            offsets = torch.arange(-length + 1, 1)
            window = rows[c[:, None], (p[:, None] + offsets).clamp(min=0)]
            window = torch.where((p[:, None] + offsets) >= 0, window, torch.zeros_like(window))
            scores.scatter_(1, window, -math.inf)
            scores[:, PAD] = -math.inf
            scores[:, table.abs().sum(1) == 0] = -math.inf  # rows the model does not know
            hr, ndcg = rank_metrics(scores, targets)
            hrs.append(hr)
            ndcgs.append(ndcg)
        model.train()
        if not hrs:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        return torch.cat(hrs), torch.cat(ndcgs)

    def compare_with_live(self, chunks: Chunks) -> Paired | None:
        """The learner against the live version on the same targets (None without a live version)."""
        live = self.shadows.get("live")
        if live is None or not chunks.n_targets:
            return None
        mine, _ = self.window_scores(self.model, self.item_table(), chunks)
        n = self.items.capacity_needed
        table = torch.zeros(n, live.table.shape[1])
        m = min(n, live.table.shape[0])
        table[:m] = live.table[:m]
        theirs, _ = self.window_scores(live.model, table, chunks)
        paired = Paired()
        paired.add(mine, theirs)
        return paired

    def gated_fit(
        self,
        chunks: Chunks,
        epochs: int,
        holdout: int,
        learning_rate: float | None = None,
        replay_ratio: float = 0.0,
        progress: Progress | None = None,
    ) -> Paired | None:
        """Fits all but the ``holdout`` newest targets, compares the result with the live version
        on those, then learns them too; returns the comparison (None without a live version).

        The live version may have learned the held-out events already, so the comparison leans
        towards it: a candidate that passes is not worse.
        """
        if holdout <= 0 or "live" not in self.shadows or chunks.sequences is None:
            self.fit(chunks, epochs, learning_rate, replay_ratio, progress)
            return None
        older, newest = chunks.split_newest(holdout)
        self.fit(older, epochs, learning_rate, replay_ratio, progress)
        paired = self.compare_with_live(newest)
        self.fit(newest, 1, learning_rate, replay_ratio)
        return paired

    # -- growing, expiring -----------------------------------------------------------------
    def _ensure_capacity(self) -> None:
        rows = self.items.capacity_needed
        self.popularity.ensure(rows)
        if rows > len(self.item_counts):
            grown = np.zeros(max(rows, 2 * len(self.item_counts)), dtype=np.int64)
            grown[: len(self.item_counts)] = self.item_counts
            self.item_counts = grown
        sizes = {
            "items": rows,
            "users": self.users.capacity_needed,
            "categories": self.categories.capacity_needed,
            "tags": self.tags.capacity_needed,
            "contexts": self.contexts.capacity_needed,
        }
        if not self.averaging:
            self.model.ensure_capacity(self.optimizer, **sizes)
            return
        if self.trained.ensure_capacity(self.optimizer, **sizes):
            # The served copy grows with the trained one's new rows.
            with torch.no_grad():
                for name in ("item_ids", "user_ids", "categories", "tags", "contexts"):
                    table, param = getattr(self.model, name), getattr(self.trained, name).weight
                    if table.weight.shape != param.shape:
                        grown = param.detach().clone()
                        grown[: table.weight.shape[0]] = table.weight
                        table.weight = torch.nn.Parameter(grown)
                        table.num_embeddings = grown.shape[0]
        if self.trained.item_learned is not self.model.item_learned:  # per-item buffers grew
            for name in ("item_learned", "item_categories", "item_tags", "item_text"):
                setattr(self.model, name, getattr(self.trained, name))

    def forget_users(self, user_ids: Iterable[str]) -> int:
        """Erases users from every per-user table: the id row (weights and optimizer moments
        reset), histories, touched items, pending counts, items waiting for the replay and the
        replay's chunks of theirs. Returns how many users were held."""
        held = 0
        rows: list[int] = []
        for u in dict.fromkeys(user_ids):
            found = False
            if u in self.users.rows:
                rows.append(self.users.remove(u))
                found = True
            for table in (
                self.user_seen_at,
                self.user_last_sequence,
                self.histories,
                self.seen,
                self.pending_users,
                self.replay_waiting,
            ):
                found = table.pop(u, None) is not None or found
            self.signals.preprocessor.forget_user(u)
            held += found
        if rows:
            self.trained.reset_rows(self.trained.user_ids, rows, self.optimizer)
            if self.averaging:
                self.model.reset_rows(self.model.user_ids, rows, None)
            self.replay.forget_users(np.array(rows))
        return held

    def forget_users_before(self, first_sequence: int) -> int:
        """Forgets the users whose newest event is before ``first_sequence``: the event log no
        longer holds anything of theirs (retention). Returns how many."""
        gone = [u for u, seq in self.user_last_sequence.items() if seq < first_sequence]
        return self.forget_users(gone)

    def expire(self) -> tuple[int, int]:
        """Frees rows of items and users unseen (in event time) for longer than ``row_ttl_s``."""
        ttl = self.config.row_ttl_s
        if ttl <= 0:
            return 0, 0
        cutoff = self.position.event_time - ttl
        item_rows = [self.items.remove(i) for i in self.items.unseen_since(cutoff)]
        self._free_item_rows(item_rows)
        gone = set(self.users.unseen_since(cutoff)) | {u for u, t in self.user_seen_at.items() if t < cutoff}
        user_rows = sum(1 for u in gone if u in self.users.rows)
        self.forget_users(gone)
        if item_rows or user_rows:
            logger.info("expired %d items and %d users unseen for %.0fs", len(item_rows), user_rows, ttl)
        return len(item_rows), user_rows

    def _free_item_rows(self, item_rows: list[int]) -> None:
        """Resets rows whose ids were removed from the map: weights and optimizer moments,
        histories, seen sets, counts, replay, follow-ups and popularity."""
        if not item_rows:
            return
        dead = set(item_rows)
        for u, history in self.histories.items():
            if any(e[0] in dead for e in history):
                self.histories[u] = deque((e for e in history if e[0] not in dead), maxlen=self.max_history)
        for rows in self.seen.values():
            rows -= dead
        self.item_counts[item_rows] = 0
        self.trained.reset_rows(self.trained.item_ids, item_rows, self.optimizer)
        if self.averaging:
            self.model.reset_rows(self.model.item_ids, item_rows, None)
            with torch.no_grad():
                self.model.item_ids.weight[item_rows] = self.trained.item_ids.weight[item_rows]
        self.replay.forget_items(np.array(item_rows))
        self.follow_ups.forget_rows(item_rows)
        self.popularity.reset_rows(np.array(item_rows))

    def remove_items(self, item_ids: Iterable[str]) -> int:
        """Drops deleted catalogue items: their rows leave every table, so the next export has no
        row, embedding, popularity or follow-up entry for them, and their later events (in flight,
        or replayed from the event log by a retrain) are dropped. Returns how many were held."""
        wanted = list(dict.fromkeys(item_ids))
        self.deleted_items.update(wanted)
        rows = [self.items.remove(i) for i in wanted if i in self.items.rows]
        self._free_item_rows(rows)
        if rows:
            logger.info("removed %d deleted catalogue items from the model", len(rows))
        return len(rows)

    def _not_deleted(self, interactions: Iterable[Interaction]) -> Iterable[Interaction]:
        deleted = self.deleted_items
        return (it for it in interactions if it.item_id not in deleted) if deleted else interactions

    # -- the catalogue ---------------------------------------------------------------------
    def add_items(self, items: Sequence[tuple[int, item_pb2.Item]], text: np.ndarray | None = None) -> int:
        """Content features of catalogue entries (a new item is scored by content before any event).

        Entries carry their FRESHREC_CATALOG stream sequence (those already held are skipped);
        sequence 0 means "not from the stream" (a catalogue file) and is always applied.
        """
        c = self.config.model
        fresh = [
            (i, (seq, it))
            for i, (seq, it) in enumerate(items)
            if seq == 0 or seq > self.position.catalogue_sequence
        ]
        for index, (_seq, item) in fresh:
            if not item.item_id:
                continue
            if item.deleted:  # a tombstone: DeleteItems removed it from the catalogue
                self.remove_items([item.item_id])
                continue
            self.deleted_items.discard(item.item_id)
            row = self.items.add(item.item_id, self.position.event_time)
            self._ensure_capacity()
            categories = [self.categories.add(x) for x in list(item.categories)[: c.max_categories]]
            tags = [self.tags.add(x) for x in list(item.tags)[: c.max_tags]]
            self._ensure_capacity()
            m = self.model
            m.item_categories[row] = 0
            m.item_tags[row] = 0
            m.item_categories[row, : len(categories)] = torch.tensor(categories, dtype=torch.long)
            m.item_tags[row, : len(tags)] = torch.tensor(tags, dtype=torch.long)
            if text is not None and c.text_dim:
                m.item_text[row] = torch.from_numpy(np.asarray(text[index], dtype=np.float32))
        if fresh:
            self.position.catalogue_sequence = max(
                self.position.catalogue_sequence, max(seq for _, (seq, _) in fresh)
            )
        return len(fresh)

    # -- pre-training and retraining -------------------------------------------------------
    def absorb(self, interactions: Iterable[Interaction]) -> dict[str, UserSequence]:
        """Folds a history in without scoring it (pre-training): maps, counts, histories, replay.

        Returns each user's sequence (earlier history first), for ``sequence_chunks``.
        """
        sequences: dict[str, UserSequence] = {}
        counted = 0
        p = self.position
        interactions_seen: list[Interaction] = []
        deleted = self.deleted_items
        for it in interactions:
            counted += 1  # an event of a deleted item counts as consumed, like a repeat
            if it.item_id in deleted:
                continue
            interactions_seen.append(it)
            p.event_time = max(p.event_time, it.time)
            p.stream_sequence = max(p.stream_sequence, it.sequence)
            self.user_seen_at[it.user_id] = max(self.user_seen_at.get(it.user_id, 0.0), it.time)
            self.user_last_sequence[it.user_id] = max(self.user_last_sequence.get(it.user_id, 0), it.sequence)
            row = self.items.add(it.item_id, it.time)
            if not it.positive:
                self.seen.setdefault(it.user_id, set()).add(row)
                continue
            entry = (row, it.type, tuple(self.contexts.add(c) for c in it.context))
            if it.user_id not in sequences:
                history = list(self.histories.get(it.user_id, ()))
                sequences[it.user_id] = UserSequence(history, [1.0] * len(history), len(history))
            sequences[it.user_id].entries.append(entry)
            sequences[it.user_id].weights.append(it.weight)
            sequences[it.user_id].numbers.append(it.sequence)
        self._ensure_capacity()
        for user_id, us in sequences.items():
            new = us.entries[us.first :]
            for entry in new:
                self.item_counts[entry[0]] += 1
            count = self.pending_users.get(user_id, 0) + len(new)
            if user_id in self.users.rows or count >= self.config.min_user_count:
                self.pending_users.pop(user_id, None)
                self.users.add(user_id, self.user_seen_at.get(user_id, 0.0))
            else:
                self.pending_users[user_id] = count
            self.seen.setdefault(user_id, set()).update(e[0] for e in new)
            self.histories[user_id] = deque(us.entries[-self.max_history :], maxlen=self.max_history)
            self.replay_waiting.pop(user_id, None)  # its items are offered below
        self._ensure_capacity()
        learned = np.flatnonzero(self.item_counts >= self.config.min_item_count)
        learned = learned[(learned > PAD) & (learned < self.model.item_learned.shape[0])]
        self.model.item_learned[torch.from_numpy(learned)] = 1.0
        self.replay.offer(self.rng, self.sequence_chunks(sequences, context=1))  # dense windows
        self._count_popularity(interactions_seen)
        self.follow_ups.add(
            (us.entries[k - 1][0], us.entries[k][0])
            for us in sequences.values()
            for k in range(max(1, us.first), len(us.entries))
        )
        p.events_learned += counted
        return sequences

    def sequence_chunks(self, sequences: dict[str, UserSequence], context: int | None = None) -> Chunks:
        """Chunks predicting every item of each sequence from ``first`` on.

        With ``context`` = L (the default) every target reads its full served window; smaller
        values make shorter chunks (a target early in a chunk then reads fewer items), which is
        how SASRec trains and costs half as much.
        """
        builder = ChunkBuilder(self.max_history, self.config.model.max_context, context)
        for user_id, us in sequences.items():
            if us.first < len(us.entries):
                numbers = us.numbers if len(us.numbers) == len(us.entries) - us.first else None
                builder.add(us.entries, us.first, us.weights[us.first :], self.users.get(user_id), numbers)
        return builder.build()

    def absorb_events(self, events: Iterable[tuple[int, event_pb2.Event]]) -> dict[str, UserSequence]:
        """``absorb`` for stream events (or a file's), through the preprocessing rules."""
        events = list(events)
        interactions = self.signals.interactions(events)
        sequences = self.absorb(interactions)
        self.position.events_learned += len(events) - len(interactions)
        if events:
            self.position.stream_sequence = max(self.position.stream_sequence, max(seq for seq, _ in events))
        return sequences

    def log_sequences(self, events: Iterable[tuple[int, event_pb2.Event]]) -> dict[str, UserSequence]:
        """Per-user sequences of a replayed event log, in the current rows (unknown ids skipped).

        The log is preprocessed afresh from its start, which gives the numbers the stream got.
        """
        signals = Signals(self.config.preprocessing, self.config.model.max_context)
        sequences: dict[str, UserSequence] = {}
        for it in signals.interactions(events):
            row = self.items.get(it.item_id)
            if not it.positive or row == PAD:
                continue
            ctx = tuple(r for r in (self.contexts.get(c) for c in it.context) if r)
            us = sequences.setdefault(it.user_id, UserSequence([], [], 0))
            us.entries.append((row, it.type, ctx))
            us.weights.append(it.weight)
            us.numbers.append(it.sequence)
        return sequences

    # -- scoring (benchmarks, tests) -------------------------------------------------------
    @torch.no_grad()
    def user_vectors(self, user_ids: Sequence[str]) -> torch.Tensor:
        """The served user vector of each user from the current histories: [U, D]."""
        self.model.eval()
        length = self.max_history
        history = torch.zeros((len(user_ids), length), dtype=torch.long)
        types = torch.zeros((len(user_ids), length), dtype=torch.long)
        for i, u in enumerate(user_ids):
            h = list(self.histories.get(u, ()))[-length:]
            if h:
                history[i, length - len(h) :] = torch.tensor([e[0] for e in h])
                types[i, length - len(h) :] = torch.tensor([e[1] for e in h])
        users = torch.tensor([self.users.get(u) for u in user_ids], dtype=torch.long)
        table = self.model.item_vectors(self.items.capacity_needed)
        vectors = self.model.encode(table, history, users, types)[:, -1]
        self.model.train()
        return vectors

    @torch.no_grad()
    def item_table(self) -> torch.Tensor:
        self.model.eval()
        table = self.model.item_vectors(self.items.capacity_needed)
        self.model.train()
        return table


class OnlineLearner(Learner):
    """A learner with default settings in a given shape, for tools and tests that build a small
    model directly (``learn`` then ``export_learner``)."""

    def __init__(self, dim: int, max_history: int, learning_rate: float, seed: int = 0) -> None:
        super().__init__(
            LearnerConfig(
                model=ModelConfig(dim=dim, max_history=max_history), learning_rate=learning_rate, seed=seed
            )
        )
