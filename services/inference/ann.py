"""Approximate nearest-neighbour retrieval (faiss HNSW, inner product) for large catalogues.

Below ``exact_limit`` items one matrix product ranks the whole catalogue exactly and no index is
built. Above it, the index is built with the model, off the request path, and swapped with it.
Filters (a category, excluded items) are applied inside the graph search through faiss ID
selectors, so a filtered query still returns k results when k exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from pydantic import BaseModel, Field


class AnnSettings(BaseModel):
    """When and how the ANN index is built."""

    exact_limit: int = Field(
        50_000,
        ge=0,
        description="Catalogue size up to which retrieval is exact; above it an ANN index is used.",
    )
    m: int = Field(32, ge=4, le=128, description="HNSW graph degree.")
    ef_construction: int = Field(200, ge=8, description="HNSW build-time beam width.")
    ef_search: int = Field(256, ge=8, description="HNSW query-time beam width (recall against speed).")
    threads: int = Field(1, ge=1, description="Threads faiss may use (index builds run beside requests).")


@dataclass(frozen=True)
class AnnIndex:
    """An HNSW index over item rows 1..N-1 of a model's item matrix (faiss id = row - 1)."""

    index: faiss.IndexHNSWFlat
    rows: int  # rows of the item matrix, padding included
    ef_search: int

    @classmethod
    def build(cls, matrix: np.ndarray, settings: AnnSettings) -> AnnIndex:
        faiss.omp_set_num_threads(settings.threads)
        index = faiss.IndexHNSWFlat(matrix.shape[1], settings.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
        index.add(np.ascontiguousarray(matrix[1:], dtype=np.float32))
        return cls(index=index, rows=matrix.shape[0], ef_search=settings.ef_search)

    def bitmap(self, rows: np.ndarray) -> np.ndarray:
        """A faiss selector bitmap (little-endian bits over faiss ids) admitting the given item rows."""
        bits = np.zeros(self.rows - 1, dtype=bool)
        rows = rows[(rows > 0) & (rows < self.rows)]
        bits[rows - 1] = True
        return np.packbits(bits, bitorder="little")

    def search(
        self,
        vector: np.ndarray,
        k: int,
        allowed_bitmap: np.ndarray | None = None,
        banned_rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Item rows and scores of the approximately best k (fewer if the filter admits fewer)."""
        k = min(k, self.rows - 1)
        if k <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        # faiss keeps raw pointers: every selector and array stays referenced until the search returns.
        keep: list[Any] = []
        selector: Any = None
        if allowed_bitmap is not None:
            selector = faiss.IDSelectorBitmap(self.rows - 1, faiss.swig_ptr(allowed_bitmap))
        if banned_rows is not None and len(banned_rows):
            banned = np.ascontiguousarray(banned_rows[banned_rows > 0] - 1, dtype=np.int64)
            batch = faiss.IDSelectorBatch(len(banned), faiss.swig_ptr(banned))
            not_banned = faiss.IDSelectorNot(batch)
            keep += [banned, batch, not_banned]
            if selector is None:
                selector = not_banned
            else:
                keep.append(selector)
                selector = faiss.IDSelectorAnd(selector, not_banned)
        # faiss's stubs leave out SearchParametersHNSW, which its SWIG module has.
        params: Any = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(self.ef_search, k)
        if selector is not None:
            params.sel = selector
        query = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        scores, ids = self.index.search(query, k, params=params)
        found = ids[0] >= 0
        return ids[0][found].astype(np.int64) + 1, scores[0][found]
