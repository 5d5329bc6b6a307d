"""What was shown: every answer's list, published on ``freshrec.recommendations.served``.

``Recommend`` and ``SimilarItems`` give each answer a ``recommendation_id`` and hand the answer to
``ServedPublisher.offer``, which only appends it to a bounded queue: the request never waits for
NATS. A task takes the queue in batches, turns each answer into a ``ServedList`` and publishes it
to JetStream (``FRESHREC_SERVED``, the id as ``Nats-Msg-Id``), waiting for the acknowledgements
of a whole batch at once. What cannot be published (queue full, NATS away or too slow to
acknowledge) is dropped and counted, never retried into a backlog that would grow without end:
``freshrec_inference_served_lists_total{outcome}``.

The stream keeps lists for ``FRESHREC_SERVED__MAX_AGE`` (bounded by the retention); forgetting a
user erases their lists (``erase_users_lists``), and for a while after (the window in which the
replica keeps no features of theirs) nothing shown to them is published.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck
from prometheus_client import Counter
from pydantic import BaseModel, Field

from freshrec.v1 import inference_pb2
from shared.erase import erase_matching
from shared.nats import MSG_ID_HEADER, SERVED_STREAM, SERVED_SUBJECT, ensure_stream, kept_stream_config
from shared.settings import RetentionSettings

logger = logging.getLogger(__name__)

SERVED = Counter(
    "freshrec_inference_served_lists_total",
    "Served lists by what became of them: published (stored by JetStream), dropped (the queue was "
    "full), failed (NATS unavailable or no acknowledgement in time).",
    ["outcome"],
)
for _outcome in ("published", "dropped", "failed"):
    SERVED.labels(_outcome)


class ServedSettings(BaseModel):
    """Publishing what each answer showed on freshrec.recommendations.served."""

    enabled: bool = Field(True, description="Publish every Recommend and SimilarItems answer's list.")
    queue: int = Field(
        10_000,
        ge=1,
        description="Answers waiting to be published; past this, new ones are dropped and counted "
        "(a slow or unreachable NATS never slows a request).",
    )
    batch: int = Field(256, ge=1, description="Lists published before waiting for their acknowledgements.")
    ack_timeout_s: float = Field(
        5.0,
        gt=0,
        description="How long a batch waits for JetStream's acknowledgements before it counts as failed.",
    )
    max_age: timedelta = Field(
        timedelta(days=7),
        description="How long FRESHREC_SERVED keeps a list (seconds or ISO 8601, e.g. P7D); never longer "
        "than the events retention.",
    )


def new_recommendation_id() -> str:
    """32 random hex digits: unguessable, so an id sent back on an event names one answer."""
    return os.urandom(16).hex()


Answer = inference_pb2.RecommendResponse | inference_pb2.SimilarItemsResponse
Request = inference_pb2.RecommendRequest | inference_pb2.SimilarItemsRequest


def served_list(request: Request, answer: Answer, served_at: float, replica: str) -> inference_pb2.ServedList:
    """The list an answer showed, as published."""
    served = inference_pb2.ServedList(
        recommendation_id=answer.recommendation_id,
        model_version=answer.model_version,
        replica=replica,
    )
    if isinstance(request, inference_pb2.RecommendRequest):
        served.rpc = "Recommend"
        served.user_id = request.user_id
        served.context.update(request.context)
    else:
        served.rpc = "SimilarItems"
        served.anchor_item_id = request.item_id
    served.served_at.FromNanoseconds(int(served_at * 1e9))
    for position, item in enumerate(answer.items):
        served.items.add(item_id=item.item_id, position=position, score=item.score, source=item.source)
    return served


class ServedPublisher:
    """Takes answers off the request path and publishes their lists."""

    def __init__(
        self,
        js: JetStreamContext,
        settings: ServedSettings,
        replica: str,
        forgotten: Callable[[str], bool] = lambda user_id: False,
    ) -> None:
        self.js = js
        self.settings = settings
        self.replica = replica
        #: Users just forgotten: what they are shown now is not kept (their events are dropped too).
        self.forgotten = forgotten
        self.pending: deque[tuple[Request, Answer, float]] = deque()
        self.ready = asyncio.Event()

    def offer(self, request: Request, answer: Answer) -> None:
        """Queues an answer (already given its id) for publishing; never blocks, never raises."""
        if isinstance(request, inference_pb2.RecommendRequest) and self.forgotten(request.user_id):
            return
        if len(self.pending) >= self.settings.queue:
            SERVED.labels("dropped").inc()
            return
        self.pending.append((request, answer, time.time()))
        self.ready.set()

    async def run(self) -> None:
        """Publishes until cancelled."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.pending:
                await self._publish_batch()

    async def _publish_batch(self) -> None:
        batch = [self.pending.popleft() for _ in range(min(self.settings.batch, len(self.pending)))]
        futures: list[asyncio.Future[PubAck]] = []
        try:
            for request, answer, served_at in batch:
                data = served_list(request, answer, served_at, self.replica).SerializeToString()
                futures.append(
                    await self.js.publish_async(
                        SERVED_SUBJECT,
                        data,
                        wait_stall=self.settings.ack_timeout_s,
                        headers={MSG_ID_HEADER: answer.recommendation_id},
                    )
                )
            done, waiting = await asyncio.wait(futures, timeout=self.settings.ack_timeout_s)
        except Exception as exc:  # disconnected, closed, stalled: count the batch, keep going
            for future in futures:
                future.cancel()
            SERVED.labels("failed").inc(len(batch))
            logger.warning("could not publish %d served lists: %s", len(batch), exc)
            await asyncio.sleep(min(1.0, self.settings.ack_timeout_s))
            return
        for future in waiting:
            future.cancel()  # releases its slot in the client's window
        stored = sum(1 for f in done if not f.cancelled() and f.exception() is None)
        SERVED.labels("published").inc(stored)
        if stored < len(batch):
            SERVED.labels("failed").inc(len(batch) - stored)
            logger.warning("%d of %d served lists were not acknowledged", len(batch) - stored, len(batch))


async def ensure_served_stream(
    js: JetStreamContext, settings: ServedSettings, retention: RetentionSettings, replicas: int
) -> None:
    """Declares ``FRESHREC_SERVED`` (every inference replica does; the settings of the last one to
    start are in effect, so give them all the same)."""
    max_age = retention.max_age_s(settings.max_age.total_seconds())
    config = kept_stream_config(SERVED_STREAM, SERVED_SUBJECT, replicas=replicas, max_age_s=max_age)
    await ensure_stream(js, config)


async def erase_users_lists(nc: NatsClient, user_id: str) -> int:
    """Erases every list served to ``user_id`` from ``FRESHREC_SERVED``; returns how many."""
    js = nc.jetstream()

    def users(data: bytes) -> bool:
        served = inference_pb2.ServedList()
        try:
            served.ParseFromString(data)
        except Exception:  # not ours: erase it if it holds the id at all
            return user_id.encode("utf-8") in data
        return served.user_id == user_id

    erased, _ = await erase_matching(js, SERVED_STREAM, SERVED_SUBJECT, lambda msg: users(msg.data))
    return erased
