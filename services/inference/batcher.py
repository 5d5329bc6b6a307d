"""User-tower calls (and exact scoring) of concurrent requests, run together in a worker thread.

A request needs one user vector: one onnxruntime call of the user tower, and, with an exact
catalogue (no ANN index), the vector's score for every item: one product with the item matrix.
Done one request at a time on the event loop, they are the largest share of a request's CPU
and block the loop while they run. ``UserTowerBatcher`` queues them instead: the requests that
reach it while a batch is computing (or in the same turn of the loop) share the next call,
which runs in a worker thread, where onnxruntime and BLAS release the GIL and the loop keeps
serving other calls meanwhile; the batch's scores are one matrix product that reads the item
matrix once. A lone request (the batch is collected over one turn of the loop) is computed on
the loop at once, as it would be without batching; under load a batch of N costs far less than
N calls. Requests holding different serving states (during a swap) are
computed per state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from prometheus_client import Histogram

from services.inference.index import ServingState

BATCH_SIZE = Histogram(
    "freshrec_inference_user_tower_batch_size",
    "Requests whose user vectors one user-tower call computed.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


@dataclass(frozen=True)
class UserScores:
    """A user vector, and its exact score for every item position when asked for (else None)."""

    vector: np.ndarray
    scores: np.ndarray | None


@dataclass
class _Pending:
    state: ServingState
    history: Sequence[tuple[str, int]]
    user_id: str
    context: dict[str, str]
    score_all: bool
    future: asyncio.Future[UserScores]


Result = UserScores | BaseException


def _compute(batch: list[_Pending]) -> list[Result]:
    """Runs in the worker thread: one user-tower call (and one product) per serving state."""
    out: list[Result] = [RuntimeError("not computed")] * len(batch)
    groups: dict[int, list[int]] = {}
    for n, p in enumerate(batch):
        groups.setdefault(id(p.state), []).append(n)
    for members in groups.values():
        state = batch[members[0]].state
        try:
            vectors = state.model.user_vectors(
                [batch[n].history for n in members],
                [batch[n].user_id for n in members],
                [batch[n].context for n in members],
            )
            scoring = [row for row, n in enumerate(members) if batch[n].score_all]
            scores = state.all_scores_batch(vectors[scoring]) if scoring else None
        except Exception as exc:  # every request of this state fails the same way
            for n in members:
                out[n] = exc
            continue
        rows = dict(zip(scoring, range(len(scoring)), strict=True))
        for row, n in enumerate(members):
            score_row = rows.get(row)
            out[n] = UserScores(
                vectors[row], None if scores is None or score_row is None else scores[score_row]
            )
    return out


class UserTowerBatcher:
    def __init__(self, max_batch: int = 64) -> None:
        self.max_batch = max_batch
        self._queue: list[_Pending] = []
        self._draining = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="user-tower")
        self._task: asyncio.Task[None] | None = None

    async def vector(
        self,
        state: ServingState,
        history: Sequence[tuple[str, int]],
        user_id: str,
        context: dict[str, str] | None = None,
        score_all: bool = False,
    ) -> UserScores:
        """The user vector for a history of (item id, event type), newest last; with
        ``score_all``, also its exact score for every position (``ServingState.all_scores``)."""
        future: asyncio.Future[UserScores] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(state, history, user_id, context or {}, score_all, future))
        if not self._draining:
            self._draining = True
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                BATCH_SIZE.observe(len(batch))
                try:
                    if len(batch) == 1:
                        # A lone request (light load): two thread hand-offs would cost more than
                        # they save, and each one waits for the GIL while a model loads.
                        results = _compute(batch)
                    else:
                        results = await loop.run_in_executor(self._executor, _compute, batch)
                except BaseException as exc:
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    raise
                for p, result in zip(batch, results, strict=True):
                    if p.future.done():  # the caller gave up
                        continue
                    if isinstance(result, BaseException):
                        p.future.set_exception(result)
                    else:
                        p.future.set_result(result)
        finally:
            self._draining = False

    async def close(self) -> None:
        """Stops the worker thread once the batch it runs (if any) is done."""
        self._executor.shutdown(wait=False, cancel_futures=True)
