"""The outbox relay: publishes committed events that are not acknowledged yet, oldest first.

Events land in the outbox when NATS is down or stalled, when a publish times out, or when the
process died between commit and publish. The relay reads its replica's unpublished rows in log
order, lets the reconciler check the ones that may already be in the stream (``reconcile.py``),
and publishes the rest with several chunks in flight, so a long outage drains at full speed
once NATS is back. It also keeps this replica's registration: at start and then periodically it
adopts the outbox of earlier incarnations of its name and of replicas that went silent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from functools import partial

from services.ingestion import metrics
from services.ingestion.publisher import Publisher
from services.ingestion.reconcile import Reconciler
from services.ingestion.store import EventLog
from shared.supervise import forever

logger = logging.getLogger(__name__)


class Relay:
    """Drains this replica's outbox whenever NATS accepts publishes."""

    def __init__(
        self,
        log: EventLog,
        publisher: Publisher,
        replica_id: str,
        replica_name: str,
        *,
        batch: int,
        interval_s: float,
        grace_s: float,
        lease_s: float,
        chunks_in_flight: int = 4,
    ) -> None:
        self.log = log
        self.publisher = publisher
        self.replica_id = replica_id
        self.replica_name = replica_name
        self.batch = batch
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.lease_s = lease_s
        self.chunks_in_flight = chunks_in_flight
        self.reconciler: Reconciler | None = None
        self._last_adopt = 0.0
        self._last_count = 0.0
        self._backlog = 0

    async def adopt(self, everything: bool = False) -> int:
        stale_before_us = int((time.time() - self.lease_s) * 1e6)
        adopted = await asyncio.to_thread(
            partial(self.log.adopt_orphans, everything=everything),
            self.replica_id,
            self.replica_name,
            stale_before_us,
        )
        self._last_adopt = time.monotonic()
        if adopted:
            metrics.ADOPTED.inc(adopted)
            logger.info("took over %d unpublished events from replicas that are gone", adopted)
        return adopted

    async def run(self) -> None:
        await forever(
            self.run_once, logger=logger, failed="outbox relay pass failed", every_s=self.interval_s
        )

    async def run_once(self) -> int:
        """One pass over the outbox; returns the number of events published."""
        now = time.monotonic()
        if now - self._last_adopt >= self.lease_s / 3:
            await self.adopt()
        # Counting is O(backlog): often while the outbox is small, every 10 s once it is large.
        if now - self._last_count >= (2 * self.interval_s if self._backlog < 100_000 else 10.0):
            self._backlog = await asyncio.to_thread(self.log.count_unpublished, self.replica_id)
            metrics.OUTBOX_BACKLOG.set(self._backlog)
            self._last_count = now
        self.publisher.release_marked()
        if not self.publisher.connected:
            return 0
        published = 0
        after = 0
        inflight: deque[tuple[asyncio.Task[int], int]] = deque()
        try:
            while self.publisher.connected:
                self.publisher.release_marked()
                before_us = int((time.time() - self.grace_s) * 1e6)
                rows = await asyncio.to_thread(
                    self.log.unpublished, self.replica_id, self.batch, after, before_us
                )
                if not rows:
                    break
                todo = [r for r in rows if r.seq not in self.publisher.in_flight]
                if todo and self.reconciler is not None:
                    now_s = time.time()
                    unsure = [r for r in todo if not self.reconciler.safe(r, now_s)]
                    if unsure:
                        # Wait for what is in flight so the scan sees it, then look the rest up.
                        while inflight:
                            task, _ = inflight.popleft()
                            published += await task
                        await self.reconciler.scan(min(r.received_at_us for r in unsure))
                        continue  # re-read from the same position: found events are marked now
                after = rows[-1].seq
                if not todo:
                    continue
                self.publisher.in_flight.update(r.seq for r in todo)
                task = asyncio.create_task(self.publisher.publish(todo, "relay"))
                inflight.append((task, len(todo)))
                if len(inflight) >= self.chunks_in_flight:
                    task, size = inflight.popleft()
                    n = await task
                    published += n
                    if n < size:
                        break  # NATS is not keeping up (or refusing): stop this pass
        finally:
            while inflight:
                task, _ = inflight.popleft()
                published += await task
        if published:
            logger.info("outbox relay published %d events", published)
        return published
