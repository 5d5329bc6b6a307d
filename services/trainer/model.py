"""The two-tower retrieval model and the id maps that let its embedding tables grow.

User tower: masked mean of the embeddings of the user's recent items (oldest first, left
padded with row 0) plus the user's own id embedding (row 0: unknown user), through an MLP.
Item tower: the item id embedding. Score: dot product. Exported to ONNX as the user tower
plus the item embedding matrix.
"""

from __future__ import annotations

import torch
from torch import nn

PAD = 0


class IdMap:
    """A collision-free map from external ids to embedding rows; row 0 is reserved."""

    def __init__(self, ids: list[str] | None = None) -> None:
        self.ids: list[str] = [""]
        self.rows: dict[str, int] = {}
        for i in ids or []:
            self.add(i)

    def add(self, external_id: str) -> int:
        row = self.rows.get(external_id)
        if row is None:
            row = self.rows[external_id] = len(self.ids)
            self.ids.append(external_id)
        return row

    def get(self, external_id: str) -> int:
        return self.rows.get(external_id, PAD)

    def __len__(self) -> int:
        """Rows in use, including the reserved row 0."""
        return len(self.ids)


def _grown(table: nn.Embedding, rows: int) -> nn.Embedding:
    """A larger copy of an embedding table; new rows start small and random."""
    capacity = table.num_embeddings
    while capacity < rows:
        capacity *= 2
    bigger = nn.Embedding(capacity, table.embedding_dim, padding_idx=PAD)
    with torch.no_grad():
        nn.init.normal_(bigger.weight, std=0.05)
        bigger.weight[: table.num_embeddings] = table.weight
        bigger.weight[PAD].zero_()
    return bigger


class TwoTower(nn.Module):
    def __init__(self, dim: int, item_capacity: int = 1024, user_capacity: int = 1024) -> None:
        super().__init__()
        self.dim = dim
        self.items = nn.Embedding(item_capacity, dim, padding_idx=PAD)
        self.users = nn.Embedding(user_capacity, dim, padding_idx=PAD)
        nn.init.normal_(self.items.weight, std=0.05)
        nn.init.normal_(self.users.weight, std=0.05)
        with torch.no_grad():
            self.items.weight[PAD].zero_()
            self.users.weight[PAD].zero_()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def ensure_capacity(self, item_rows: int, user_rows: int) -> bool:
        """Grows the tables to hold the given rows; True when a table grew (optimizer must be rebuilt)."""
        grew = False
        if item_rows > self.items.num_embeddings:
            self.items = _grown(self.items, item_rows)
            grew = True
        if user_rows > self.users.num_embeddings:
            self.users = _grown(self.users, user_rows)
            grew = True
        return grew

    def forward(self, history: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """history: [B, L] item rows (0 = padding); user: [B] user rows (0 = unknown) -> [B, dim]."""
        mask = (history != PAD).unsqueeze(-1).to(self.items.weight.dtype)
        pooled = (self.items(history) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.mlp(torch.cat([pooled, self.users(user)], dim=-1))

    def item_matrix(self, rows: int) -> torch.Tensor:
        """The first ``rows`` item embeddings (row 0 is padding and scores nothing)."""
        return self.items.weight[:rows]
