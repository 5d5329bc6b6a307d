"""The two-tower retrieval model and the id maps that let its tables grow.

User tower: a causal self-attention encoder over the user's recent items (SASRec-like: item
vectors plus event-type embeddings, pre-LN blocks, a learned attention bias per distance so
the output at a position depends only on what came before it, never on where the window
starts; each block sees a local window, the stack exactly ``max_history`` items), plus the
user's id embedding (row 0: unknown user) and the request context. The output at the last
position is the user vector; during training every position predicts the item that follows it.

Item tower: an id embedding (switched on once the item has enough interactions: frequency
filtering) plus content: mean category embedding, mean tag embedding and, with the ``text``
extra, a projection of a sentence-encoder embedding of title and description. An item nobody
touched yet is represented by its content alone. Input and output item vectors are shared.

Score: dot product. Exported to ONNX as the user tower with the item vectors folded in as a
constant, plus the item-vector matrix and an optional content-only item tower.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PAD = 0
#: EventType numbers go up to 7 (DISLIKE); row 0 is padding.
EVENT_TYPE_ROWS = 8
#: Attention scores of masked pairs (finite, so exported graphs never produce NaN).
MASKED = -1e9


@dataclass(frozen=True)
class ModelConfig:
    """The shape of the network; stored in every checkpoint (a checkpoint decides its own shape)."""

    dim: int = 64
    max_history: int = 50
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_categories: int = 4
    max_tags: int = 8
    max_context: int = 0
    text_dim: int = 0
    event_types: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class IdMap:
    """A collision-free map from external ids to table rows; row 0 is reserved.

    Rows of expired ids go to a free list and are handed out again (after the caller reset
    them), so a table never grows beyond the ids alive at once.
    """

    def __init__(self) -> None:
        self.ids: list[str] = [""]
        self.rows: dict[str, int] = {}
        self.free: list[int] = []
        self.last_seen: list[float] = [0.0]

    def add(self, external_id: str, seen_at: float = 0.0) -> int:
        row = self.rows.get(external_id)
        if row is None:
            if self.free:
                row = self.free.pop()
                self.ids[row] = external_id
                self.last_seen[row] = seen_at
            else:
                row = len(self.ids)
                self.ids.append(external_id)
                self.last_seen.append(seen_at)
            self.rows[external_id] = row
        elif seen_at > self.last_seen[row]:
            self.last_seen[row] = seen_at
        return row

    def get(self, external_id: str) -> int:
        return self.rows.get(external_id, PAD)

    def remove(self, external_id: str) -> int:
        row = self.rows.pop(external_id)
        self.ids[row] = ""
        self.last_seen[row] = 0.0
        self.free.append(row)
        return row

    def unseen_since(self, cutoff: float) -> list[str]:
        return [i for i, r in self.rows.items() if self.last_seen[r] < cutoff]

    def live_rows(self) -> list[int]:
        """Rows in use, ascending (row 0 excluded)."""
        return sorted(self.rows.values())

    @property
    def capacity_needed(self) -> int:
        """Rows a table needs to hold every row handed out, including row 0."""
        return len(self.ids)

    def __len__(self) -> int:
        """Ids currently mapped (row 0 and free rows excluded)."""
        return len(self.rows)

    def state(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "free": list(self.free), "last_seen": list(self.last_seen)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> IdMap:
        m = cls()
        m.ids = list(state["ids"])
        m.free = list(state["free"])
        m.last_seen = [float(t) for t in state["last_seen"]]
        m.rows = {i: r for r, i in enumerate(m.ids) if r and i}
        return m


def _replace_parameter(optimizer: torch.optim.Optimizer | None, old: torch.Tensor, new: torch.Tensor) -> None:
    """Points the optimizer at a grown parameter, keeping its state (moments padded with zeros)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    grown: dict[str, Any] = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            padded = torch.zeros_like(new.data)
            padded[: old.shape[0]] = value
            grown[key] = padded
        else:
            grown[key] = value
    optimizer.state[new] = grown


def _capacity(current: int, needed: int) -> int:
    capacity = max(current, 1)
    while capacity < needed:
        capacity *= 2
    return capacity


class Block(nn.Module):
    """Pre-LN causal self-attention and feed-forward, written with plain ops so it exports cleanly."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """x [B, S, D], bias [B, H, Q, S] -> [B, Q, D]: the outputs of the last Q = ``queries``
        positions (all S by default), each attending over all S."""
        b, length, dim = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).reshape(b, length, 3, h, dim // h).permute(2, 0, 3, 1, 4)
        if queries is not None and queries < length:
            q, x = q[:, :, -queries:], x[:, -queries:]
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(dim // h)) + bias
        attention = torch.softmax(scores, dim=-1)
        y = (attention @ v).transpose(1, 2).reshape(b, x.shape[1], dim)
        x = x + self.drop(self.proj(y))
        x = x + self.drop(self.ff(self.ln2(x)))
        return x


class TwoTower(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        item_capacity: int = 1024,
        user_capacity: int = 1024,
        category_capacity: int = 64,
        tag_capacity: int = 256,
        context_capacity: int = 64,
    ) -> None:
        super().__init__()
        c = self.config = config
        d = c.dim
        self.item_ids = nn.Embedding(item_capacity, d)
        self.user_ids = nn.Embedding(user_capacity, d)
        self.categories = nn.Embedding(category_capacity, d)
        self.tags = nn.Embedding(tag_capacity, d)
        self.contexts = nn.Embedding(context_capacity, d)
        self.event_types = nn.Embedding(EVENT_TYPE_ROWS, d)
        self.text = nn.Linear(c.text_dim, d, bias=False) if c.text_dim else None
        # One learned bias per head and distance (0 = attending to itself).
        self.distance_bias = nn.Parameter(torch.zeros(c.max_history, c.heads))
        self.blocks = nn.ModuleList(Block(d, c.heads, c.dropout) for _ in range(c.blocks))
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(c.dropout)
        for table in (
            self.item_ids,
            self.user_ids,
            self.categories,
            self.tags,
            self.contexts,
            self.event_types,
        ):
            nn.init.normal_(table.weight, std=0.05)
        with torch.no_grad():
            # A user's id embedding starts at zero: until it learns, the user scores like an unknown one.
            self.user_ids.weight.zero_()
            for table in (self.categories, self.tags, self.contexts, self.event_types):
                table.weight[PAD].zero_()
        # Per item row: whether its id embedding is switched on, and its content features.
        self.register_buffer("item_learned", torch.zeros(item_capacity))
        self.register_buffer(
            "item_categories", torch.zeros(item_capacity, c.max_categories, dtype=torch.long)
        )
        self.register_buffer("item_tags", torch.zeros(item_capacity, c.max_tags, dtype=torch.long))
        self.register_buffer("item_text", torch.zeros(item_capacity, max(c.text_dim, 1)))
        # Block b attends to the windows[b] items up to each position (itself included); the windows
        # add up to a receptive field of exactly max_history items, so the vector at a position of
        # a training chunk (up to 2L long) reads the same items the exported tower reads.
        self.windows = layer_windows(c.max_history, c.blocks)
        index = torch.arange(2 * c.max_history)
        distance = index[:, None] - index[None, :]
        self.register_buffer("distance", distance.clamp(0, c.max_history - 1), persistent=False)
        for b, w in enumerate(self.windows):
            self.register_buffer(f"window{b}", (distance >= 0) & (distance < w), persistent=False)
        self.register_buffer("diagonal", torch.eye(2 * c.max_history, dtype=torch.bool), persistent=False)

    item_learned: torch.Tensor
    item_categories: torch.Tensor
    item_tags: torch.Tensor
    item_text: torch.Tensor
    distance: torch.Tensor
    diagonal: torch.Tensor

    @classmethod
    def from_state_dict(cls, config: ModelConfig, weights: dict[str, torch.Tensor]) -> TwoTower:
        model = cls(
            config,
            item_capacity=weights["item_ids.weight"].shape[0],
            user_capacity=weights["user_ids.weight"].shape[0],
            category_capacity=weights["categories.weight"].shape[0],
            tag_capacity=weights["tags.weight"].shape[0],
            context_capacity=weights["contexts.weight"].shape[0],
        )
        model.load_state_dict(weights)
        return model

    # -- growing and resetting rows ----------------------------------------------------------
    def ensure_capacity(
        self,
        optimizer: torch.optim.Optimizer | None,
        items: int = 0,
        users: int = 0,
        categories: int = 0,
        tags: int = 0,
        contexts: int = 0,
    ) -> bool:
        """Grows tables (by doubling) to hold the given rows; the optimizer keeps its moments."""
        grew = False
        for table, needed in (
            (self.item_ids, items),
            (self.user_ids, users),
            (self.categories, categories),
            (self.tags, tags),
            (self.contexts, contexts),
        ):
            if needed > table.num_embeddings:
                std = 0.0 if table is self.user_ids else 0.05
                self._grow(table, _capacity(table.num_embeddings, needed), optimizer, std)
                grew = True
        rows = self.item_ids.num_embeddings
        if self.item_learned.shape[0] < rows:
            for name in ("item_learned", "item_categories", "item_tags", "item_text"):
                old = getattr(self, name)
                new = torch.zeros((rows, *old.shape[1:]), dtype=old.dtype)
                new[: old.shape[0]] = old
                setattr(self, name, new)
        return grew

    @staticmethod
    def _grow(
        table: nn.Embedding, capacity: int, optimizer: torch.optim.Optimizer | None, std: float
    ) -> None:
        old = table.weight
        data = torch.zeros(capacity, old.shape[1])
        if std:
            nn.init.normal_(data, std=std)
        data[: old.shape[0]] = old.data
        new = nn.Parameter(data)
        table.weight = new
        table.num_embeddings = capacity
        _replace_parameter(optimizer, old, new)

    @torch.no_grad()
    def reset_rows(
        self, table: nn.Embedding, rows: list[int], optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Re-initialises rows handed back by an IdMap (weights and optimizer moments)."""
        if not rows:
            return
        index = torch.tensor(rows)
        fresh = torch.zeros(len(rows), table.embedding_dim)
        if table is not self.user_ids:
            nn.init.normal_(fresh, std=0.05)
        table.weight[index] = fresh
        if optimizer is not None:
            for value in optimizer.state.get(table.weight, {}).values():
                if torch.is_tensor(value) and value.shape == table.weight.shape:
                    value[index] = 0.0
        if table is self.item_ids:
            self.item_learned[index] = 0.0
            self.item_categories[index] = 0
            self.item_tags[index] = 0
            self.item_text[index] = 0.0

    # -- the item tower ----------------------------------------------------------------------
    def content_vectors(
        self,
        categories: torch.Tensor,
        tags: torch.Tensor,
        text: torch.Tensor | None = None,
        exportable: bool = False,
    ) -> torch.Tensor:
        """Content part of item vectors: categories [N, C], tags [N, T] (0 = none), text [N, E].

        Training takes the means with ``embedding_bag`` (no [N, C, D] intermediate: a third of
        the time, forward and backward); the ONNX exporter turns that into loops, so an exported
        tower takes them with plain ops (``exportable``), which give the same vectors.
        """
        if exportable:
            vector = _masked_mean(self.categories(categories), categories != PAD)
            vector = vector + _masked_mean(self.tags(tags), tags != PAD)
        else:
            vector = F.embedding_bag(categories, self.categories.weight, mode="mean", padding_idx=PAD)
            vector = vector + F.embedding_bag(tags, self.tags.weight, mode="mean", padding_idx=PAD)
        if self.text is not None and text is not None:
            vector = vector + self.text(text)
        return vector

    def item_vectors(self, rows: torch.Tensor | int, id_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors for a tensor of rows, or for rows ``[0, n)`` given an int; row 0 is zero.

        ``id_keep`` (same shape as the rows, 0/1) drops id embeddings for training, so the
        content part must carry items by itself (what a cold item has).
        """
        if isinstance(rows, int):
            ids = self.item_ids.weight[:rows]
            learned = self.item_learned[:rows]
            categories, tags, text = self.item_categories[:rows], self.item_tags[:rows], self.item_text[:rows]
        else:
            ids = self.item_ids(rows)
            learned = self.item_learned[rows]
            categories, tags, text = self.item_categories[rows], self.item_tags[rows], self.item_text[rows]
        keep = learned if id_keep is None else learned * id_keep
        return ids * keep.unsqueeze(-1) + self.content_vectors(categories, tags, text)

    # -- the user tower ----------------------------------------------------------------------
    def encode(
        self,
        item_table: torch.Tensor,
        history: torch.Tensor,
        user: torch.Tensor,
        history_types: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        outputs: int | None = None,
    ) -> torch.Tensor:
        """User vectors at every position: history [B, S] rows into ``item_table`` (0 = padding,
        oldest first; S <= 2L), user [B], history_types [B, S], context [B, S, K] or [B, K]
        -> [B, S, D]. The vector at position p reads the (at most L) items up to p.

        With ``outputs``, only the last that many positions' vectors are returned -> [B, outputs, D],
        and each block computes only the positions the blocks above it read (training on a new
        event's chunk, whose targets are its newest positions, skips most of its context).
        """
        x = F.embedding(history, item_table)
        if history_types is not None and self.config.event_types:
            x = x + self.event_types(history_types)
        x = self.drop(x)
        length = history.shape[1]
        # Positions each block outputs: the last block what is asked; a block below it that plus
        # the window the block above reads back.
        rows = [length] * len(self.blocks)
        if outputs is not None:
            rows[-1] = min(length, outputs)
            for b in range(len(self.blocks) - 2, -1, -1):
                rows[b] = min(length, rows[b + 1] + self.windows[b + 1] - 1)
        present = history != PAD
        bias = self.distance_bias[self.distance[:length, :length]].permute(2, 0, 1)[None]  # [1, H, L, L]
        masked = torch.full_like(bias, MASKED)
        diagonal = self.diagonal[:length, :length]
        for b, block in enumerate(self.blocks):
            window: torch.Tensor = getattr(self, f"window{b}")[:length, :length]
            allowed = (window & present[:, None, :]) | diagonal
            keys, queries = x.shape[1], rows[b]
            block_bias, block_masked = bias, masked
            if queries < length or keys < length:  # only with ``outputs``: exported graphs unchanged
                allowed = allowed[:, length - queries :, length - keys :]
                block_bias = bias[:, :, length - queries :, length - keys :]
                block_masked = masked[:, :, :queries, :keys]
            x = block(x, torch.where(allowed[:, None, :, :], block_bias, block_masked), queries)
        out: torch.Tensor = self.norm(x) + self.user_ids(user)[:, None, :]
        if context is not None and self.config.max_context:
            if context.dim() == 2:
                context = context[:, None, :]
            elif outputs is not None:
                context = context[:, -x.shape[1] :]
            out = out + _masked_mean(self.contexts(context), context != PAD)
        return out

    def forward(
        self,
        history: torch.Tensor,
        user: torch.Tensor,
        history_types: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The user vector: history [B, L] item rows, oldest first, left-padded -> [B, D]."""
        table = self.item_vectors(self.item_ids.num_embeddings)
        return self.encode(table, history, user, history_types, context)[:, -1]


def layer_windows(receptive_field: int, blocks: int) -> list[int]:
    """Per-block attention windows whose stack reads exactly ``receptive_field`` items."""
    reach = receptive_field - 1
    return [reach // blocks + (1 if b < reach % blocks else 0) + 1 for b in range(blocks)]


def _masked_mean(vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the second-to-last axis of the rows where mask is true (zero when none)."""
    weights = mask.to(vectors.dtype).unsqueeze(-1)
    return (vectors * weights).sum(-2) / weights.sum(-2).clamp(min=1.0)
