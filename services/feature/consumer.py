"""The feature service's durable consumer: apply events to memory, commit behind, then ack.

Exactly-once effects:

- Each event is applied in stream order; an event whose stream sequence is not above the
  state's watermark was applied before (a redelivery) and is skipped.
- What a batch changed is committed to SQL together with the new watermark in one transaction
  (``FeatureStore.save``); only then is the batch acknowledged (``AckPolicy.ALL``: one ack
  covers it all). Commits run in a worker thread while the next batch is applied, at most one
  at a time, so reads are served from memory and SQL follows a batch behind.
- At start the durable consumer is checked against the position in SQL: if it delivered
  anything past that position (a crash after delivery and before commit), it is recreated
  to start right after the position, so nothing delivered but never committed is lost.
- A failed commit reloads the state from SQL and resubscribes the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import NotFoundError

from freshrec.v1 import event_pb2
from services.feature import metrics
from services.feature.settings import FeatureSettings
from services.feature.state import FeatureState, Watermark
from services.feature.store import FeatureStore
from shared.nats import EVENTS_STREAM, fetch_batch

logger = logging.getLogger(__name__)

#: Events applied between two yields to the event loop, so reads are not held up by a big batch.
YIELD_EVERY = 256


def consumer_config(settings: FeatureSettings, start_after: int) -> ConsumerConfig:
    filters = settings.partition.filter_subjects()
    return ConsumerConfig(
        durable_name=settings.replica_name,
        ack_policy=AckPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_ack_pending=100_000,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_after + 1,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
    )


def _filters(info: ConsumerInfo) -> list[str]:
    config = info.config
    return sorted(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))


async def bind_durable(
    js: JetStreamContext, settings: FeatureSettings, position: int
) -> JetStreamContext.PullSubscription:
    """Binds the replica's durable consumer, (re)creating it to start right after ``position``
    unless it has delivered exactly up to there with this replica's subject filters."""
    name = settings.replica_name
    try:
        info: ConsumerInfo | None = await js.consumer_info(EVENTS_STREAM, name)
    except NotFoundError:
        info = None
    if info is not None:
        delivered = info.delivered.stream_seq if info.delivered else 0
        if delivered != position or _filters(info) != sorted(settings.partition.filter_subjects()):
            logger.warning(
                "durable consumer %s delivered up to %s but SQL holds %d (or its filters changed); "
                "recreating it to resume after %d",
                name,
                delivered,
                position,
                position,
            )
            await js.delete_consumer(EVENTS_STREAM, name)
            info = None
    if info is None:
        await js.add_consumer(EVENTS_STREAM, consumer_config(settings, position))
    return await js.pull_subscribe_bind(durable=name, stream=EVENTS_STREAM)


class FeatureConsumer:
    def __init__(
        self, js: JetStreamContext, state: FeatureState, store: FeatureStore, settings: FeatureSettings
    ):
        self.js = js
        self.state = state
        self.store = store
        self.settings = settings
        self._commit: asyncio.Task[bool] | None = None
        self._broken = False  # a commit failed: memory is ahead of SQL until recovered
        self.ready = asyncio.Event()

    async def run(self) -> None:
        """Consumes until cancelled; after any failure (NATS or SQL) it resumes from SQL."""
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("event consumer failed; resuming from the position in SQL in 1 s")
                await asyncio.sleep(1.0)

    async def _consume(self) -> None:
        psub = await bind_durable(self.js, self.settings, self.state.watermark.stream_sequence)
        self.ready.set()
        try:
            while True:
                msgs = await fetch_batch(
                    psub, self.settings.fetch_batch, timeout_s=self.settings.fetch_wait_s
                )
                if msgs:
                    await self.apply(msgs)
                if self._commit is not None and self._commit.done() and not self._commit.result():
                    self._broken = True
                if self._broken:
                    await self._reload()
                    await psub.unsubscribe()
                    psub = await bind_durable(self.js, self.settings, self.state.watermark.stream_sequence)
        finally:
            # Commit what was applied, so a restart resumes without replaying; if that fails,
            # memory is ahead of SQL and is reloaded before consuming again.
            if not await asyncio.shield(self._drain()):
                await self._reload()
            with contextlib.suppress(Exception):
                # A pull subscription left open makes the connection's drain wait for its timeout.
                await psub.unsubscribe()

    async def apply(self, msgs: list[Msg]) -> None:
        """Applies a batch to memory and starts its commit (after the previous one finished)."""
        state = self.state
        applied = skipped = 0
        accepted_at: list[float] = []
        now = time.time()
        for n, msg in enumerate(msgs):
            if n % 64 == 63:
                now = time.time()
            meta = msg.metadata
            event = event_pb2.Event()
            try:
                event.ParseFromString(msg.data)
            except DecodeError:
                # Ingestion only publishes what it parsed; never stall the stream on one bad message.
                logger.error("stream message %d is not a freshrec.v1.Event; skipped", meta.sequence.stream)
                state.watermark = Watermark(
                    max(state.watermark.stream_sequence, meta.sequence.stream), state.watermark.event_time
                )
                continue
            if state.apply(event, meta.sequence.stream):
                applied += 1
                accepted = meta.timestamp.timestamp()
                accepted_at.append(accepted)
                metrics.EVENT_LAG.observe(max(0.0, now - accepted))
            else:
                skipped += 1
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
        metrics.BATCH_SIZE.observe(len(msgs))
        metrics.EVENTS_APPLIED.inc(applied)
        if skipped:
            metrics.REDELIVERIES_SKIPPED.inc(skipped)
        metrics.count_rules(state.preprocessor.take_counts())
        metrics.WATERMARK_SEQUENCE.set(state.watermark.stream_sequence)
        metrics.WATERMARK_EVENT_TIME.set(state.watermark.event_time)
        metrics.USERS.set(len(state.users))
        metrics.ITEMS.set(len(state.items))
        await self._start_commit(msgs[-1], accepted_at)

    async def _start_commit(self, last: Msg | None, accepted_at: list[float]) -> None:
        if self._broken or (self._commit is not None and not await self._commit):
            self._broken = True  # the previous commit failed: the loop recovers before anything else
            return
        users, items, watermark = self.state.take_dirty()
        self._commit = asyncio.create_task(self._save(users, items, watermark, last, accepted_at))

    async def _save(
        self, users, items, watermark: Watermark, last: Msg | None, accepted_at: list[float]
    ) -> bool:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            if users or items or last is not None:
                await asyncio.to_thread(self.store.save, users, items, watermark)
        except Exception:
            metrics.COMMIT_FAILURES.inc()
            logger.exception(
                "committing %d users and %d items failed; reloading from SQL", len(users), len(items)
            )
            return False
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        if accepted_at:
            now = time.time()
            for accepted in accepted_at[:: max(1, len(accepted_at) // 50)]:
                metrics.COMMIT_LAG.observe(max(0.0, now - accepted))
        if last is not None:
            try:
                await last.ack()
            except Exception as exc:
                # Committed: a redelivery is skipped by sequence, so a lost ack costs nothing.
                logger.warning("ack after commit failed (%s); redeliveries will be skipped", exc)
        return True

    async def _drain(self) -> bool:
        """Waits for the commit in flight and commits anything applied since; True when SQL
        then holds everything memory does."""
        try:
            if self._broken or (self._commit is not None and not await self._commit):
                return False
            if self.state.dirty_users or self.state.dirty_items:
                users, items, watermark = self.state.take_dirty()
                await asyncio.to_thread(self.store.save, users, items, watermark)
            return True
        except Exception:
            logger.exception("final commit failed; the state is reloaded from SQL")
            return False
        finally:
            self._commit = None

    async def _reload(self) -> None:
        """Memory got ahead of SQL (a commit failed): reload it from SQL, retrying until it works."""
        while True:
            fresh = FeatureState(
                self.state.max_recent, self.state.preprocessor.settings, self.state.popularity_settings
            )
            try:
                await asyncio.to_thread(self.store.load, fresh)
                break
            except Exception:
                logger.exception("reloading state from SQL failed; retrying")
                await asyncio.sleep(1.0)
        self.state.__dict__.update(fresh.__dict__)  # in place: the servicer holds this object
        self._commit = None
        self._broken = False
        logger.info("state reloaded from SQL at stream position %d", self.state.watermark.stream_sequence)
