"""The feature service's durable consumer: apply events to memory, commit behind, then ack.

Exactly-once effects:

- Each event is applied in stream order; an event whose stream sequence is not above the
  state's watermark was applied before (a redelivery) and is skipped.
- What the applied events changed is committed to SQL together with the new watermark in one
  transaction (``FeatureStore.save``); only then are they acknowledged (``AckPolicy.ALL``: one
  ack of the last one covers them all). Commits run at most one at a time and at most every
  ``commit_interval_s``, while later events keep being applied: the changed users and items are
  serialised a slice at a time (copy on write, ``FeatureState.begin_snapshot``), then written
  in a worker thread. Reads are served from memory and SQL follows behind.
- At start the durable consumer is checked against the position in SQL: if it delivered
  anything past that position (a crash after delivery and before commit), it is recreated to
  start right after the position, so nothing delivered but never committed is lost.
- A failed commit (or any other failure) reloads the state from SQL and resubscribes the same
  way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf.message import DecodeError
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import NotFoundError

from freshrec.v1 import event_pb2
from services.feature import metrics
from services.feature.pull import Puller, stream_position
from services.feature.settings import FeatureSettings
from services.feature.state import FeatureState, Snapshot
from services.feature.store import FeatureStore
from shared.forget import RecentlyForgotten
from shared.nats import EVENTS_STREAM
from shared.supervise import forever, raise_if_cancelling, retry

logger = logging.getLogger(__name__)

#: Events applied between two yields to the event loop, so reads are not held up by a big batch.
YIELD_EVERY = 256
#: Documents a commit serialises between two yields to the event loop.
SNAPSHOT_SLICE = 128
#: One event in this many has its event→feature lag recorded (the histogram is a sample).
LAG_SAMPLE = 8


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


async def ensure_durable(js: JetStreamContext, settings: FeatureSettings, position: int) -> None:
    """Makes the replica's durable consumer resume right after ``position``: (re)creates it
    unless it has delivered exactly up to there, with this replica's subject filters."""
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


class FeatureConsumer:
    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        state: FeatureState,
        store: FeatureStore,
        settings: FeatureSettings,
    ) -> None:
        self.nc = nc
        self.js = js
        self.state = state
        self.store = store
        self.settings = settings
        self._commit: asyncio.Task[bool] | None = None
        self._commit_started = 0.0
        self._broken = False  # a commit failed: memory is ahead of SQL until reloaded
        self._unacked: Msg | None = None  # the last applied message not yet covered by a commit
        self._accepted: list[float] = []  # JetStream times of a sample of uncommitted events
        self.ready = asyncio.Event()
        #: Users just forgotten: events of theirs still on their way are skipped (memory only).
        self.forgotten = RecentlyForgotten()

    async def run(self) -> None:
        """Consumes until cancelled; after any failure (NATS or SQL) it resumes from SQL."""
        await forever(
            self._consume,
            logger=logger,
            failed="event consumer failed; resuming from the position in SQL in 1 s",
            retry_s=1.0,
        )

    async def _consume(self) -> None:
        s = self.settings
        await ensure_durable(self.js, s, self.state.watermark.stream_sequence)
        puller = await Puller(self.nc, EVENTS_STREAM, s.replica_name).start()
        self.ready.set()
        try:
            while True:
                raise_if_cancelling()
                msgs = await puller.fetch(s.fetch_batch, s.fetch_wait_s)
                if msgs:
                    await self.apply(msgs)
                else:
                    await self._maybe_commit()
                if self._broken:
                    await self._reload()
                    await puller.close()
                    await ensure_durable(self.js, s, self.state.watermark.stream_sequence)
                    puller = await Puller(self.nc, EVENTS_STREAM, s.replica_name).start()
        except asyncio.CancelledError:
            # Stopping: commit what was applied, so the next start resumes without replaying.
            await asyncio.shield(self.flush())
            raise
        except Exception:
            # Failing: if what was applied cannot be committed, memory is ahead of SQL and is
            # reloaded before consuming again.
            if not await asyncio.shield(self.flush()):
                await self._reload()
            raise
        finally:
            with contextlib.suppress(Exception):
                await puller.close()

    async def apply(self, msgs: list[Msg]) -> None:
        """Applies a batch to memory, then commits if one is due."""
        state = self.state
        applied = skipped = 0
        lag = metrics.EVENT_LAG
        now = time.time()
        forgotten = self.forgotten if self.forgotten else None
        for n, msg in enumerate(msgs):
            sequence, accepted_ns = stream_position(msg.reply)
            event = event_pb2.Event()
            try:
                event.ParseFromString(msg.data)
            except DecodeError:
                # Ingestion only publishes what it parsed; never stall the stream on one bad message.
                logger.error("stream message %d is not a freshrec.v1.Event; skipped", sequence)
                if sequence > state.watermark.stream_sequence:
                    state.watermark.stream_sequence = sequence
                continue
            if forgotten is not None and forgotten.holds(event.user_id):
                if sequence > state.watermark.stream_sequence:
                    state.watermark.stream_sequence = sequence
                continue
            if state.apply(event, sequence, accepted_ns / 1e9):
                applied += 1
                if n % LAG_SAMPLE == 0:
                    accepted = accepted_ns / 1e9
                    self._accepted.append(accepted)
                    lag.observe(max(0.0, now - accepted))
            else:
                skipped += 1
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
                now = time.time()
        self._unacked = msgs[-1]
        metrics.BATCH_SIZE.observe(len(msgs))
        metrics.EVENTS_APPLIED.inc(applied)
        if skipped:
            metrics.REDELIVERIES_SKIPPED.inc(skipped)
        metrics.count_rules(state.preprocessor.take_counts())
        metrics.WATERMARK_SEQUENCE.set(state.watermark.stream_sequence)
        metrics.WATERMARK_EVENT_TIME.set(state.watermark.event_time)
        metrics.USERS.set(len(state.users))
        metrics.ITEMS.set(len(state.items))
        await self._maybe_commit()

    async def _maybe_commit(self, force: bool = False) -> None:
        """Starts a commit of everything applied since the last one, unless one is still running
        or the last started less than ``commit_interval_s`` ago (``force``: wait for it and go)."""
        if self._commit is not None:
            if not self._commit.done() and not force:
                return
            ok = await self._commit
            self._commit = None
            if not ok:
                self._broken = True
                return
        if self._broken:
            return
        state = self.state
        if self._unacked is None and not (state.dirty_users or state.dirty_items or state.deleted_users):
            return
        if not force and time.monotonic() - self._commit_started < self.settings.commit_interval_s:
            return
        snapshot = state.begin_snapshot()
        last, self._unacked = self._unacked, None
        accepted, self._accepted = self._accepted, []
        self._commit_started = time.monotonic()
        self._commit = asyncio.create_task(self._save(snapshot, last, accepted))

    async def _save(self, snapshot: Snapshot, last: Msg | None, accepted: list[float]) -> bool:
        started = time.perf_counter()
        try:
            # Serialised on the loop a slice at a time, while events keep being applied.
            while not self.state.snapshot_step(SNAPSHOT_SLICE):
                await asyncio.sleep(0)
            await asyncio.to_thread(
                self.store.save, snapshot.users, snapshot.items, snapshot.watermark, snapshot.deleted_users
            )
        except Exception:
            self.state.abandon_snapshot()
            metrics.COMMIT_FAILURES.inc()
            logger.exception(
                "committing %d users and %d items failed; reloading from SQL",
                len(snapshot.users),
                len(snapshot.items),
            )
            return False
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        now = time.time()
        for t in accepted:
            metrics.COMMIT_LAG.observe(max(0.0, now - t))
        if last is not None:
            try:
                await last.ack()
            except Exception as exc:
                # Committed: a redelivery is skipped by sequence, so a lost ack costs nothing.
                logger.warning("ack after commit failed (%s); redeliveries will be skipped", exc)
        return True

    async def flush(self) -> bool:
        """Commits everything applied so far and waits for it; True when SQL then holds all
        that memory does."""
        try:
            await self._maybe_commit(force=True)
            if self._commit is not None:
                ok = await self._commit
                self._commit = None
                self._broken = self._broken or not ok
        except Exception:
            logger.exception("commit failed; the state is reloaded from SQL")
            self._broken = True
        return not self._broken

    async def _reload(self) -> None:
        """Memory got ahead of SQL (a commit failed): reload it from SQL, retrying until it works."""

        async def load() -> FeatureState:
            fresh = FeatureState(
                self.state.max_recent,
                self.state.preprocessor.settings,
                self.state.popularity_settings,
                self.state.max_seen,
            )
            await asyncio.to_thread(self.store.load, fresh)
            return fresh

        fresh = await retry(
            load, logger=logger, failed="reloading state from SQL failed; retrying", retry_s=1.0
        )
        self.state.__dict__.update(fresh.__dict__)  # in place: the servicer holds this object
        self._commit = None
        self._broken = False
        self._unacked = None
        self._accepted = []
        logger.info("state reloaded from SQL at stream position %d", self.state.watermark.stream_sequence)
