"""Exactly-once publishing beyond the JetStream duplicate window.

JetStream drops a second message with the same ``Nats-Msg-Id`` only within the stream's
duplicate window (2 minutes by default). An event that was committed, published, and not yet
marked published when ingestion died (or whose acknowledgement never came) may already be in
FRESHREC_EVENTS; if the relay republishes it after the window has passed, consumers would see
it twice. The rule the relay follows:

* A copy of an event can only exist from the moment it was committed (``received_at``), so an
  event younger than ``window - margin`` may be republished as is: JetStream drops the copy.
* An event the relay knows it never sent (stored by this process while NATS was down) may be
  published as is: no copy can exist.
* Anything else is first looked up in the stream: a scan of the message headers from
  ``received_at - clock skew`` to the stream's end marks every event found there published.
  After a scan that started at time S, a copy not found can only have been stored after S, so
  the rule above applies with S in place of ``received_at``; later scans continue from the last
  sequence read, so a long drain re-reads only what it added itself.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.ingestion import metrics
from services.ingestion.store import OutboxEvent
from shared.nats import MSG_ID_HEADER, fetch_batch

logger = logging.getLogger(__name__)


class RangeSet:
    """A set of integers kept as sorted, disjoint, inclusive ranges (compact for runs of seqs)."""

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in zip(self._lo, self._hi, strict=True))

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._lo, self._hi, strict=True))

    def __contains__(self, value: int) -> bool:
        i = bisect.bisect_right(self._lo, value) - 1
        return i >= 0 and value <= self._hi[i]

    def clear(self) -> None:
        self._lo.clear()
        self._hi.clear()

    def add(self, lo: int, hi: int) -> None:
        """Adds [lo, hi], merging with touching or overlapping ranges."""
        i = bisect.bisect_left(self._hi, lo - 1)
        j = bisect.bisect_right(self._lo, hi + 1)
        if i < j:
            lo = min(lo, self._lo[i])
            hi = max(hi, self._hi[j - 1])
        self._lo[i:j] = [lo]
        self._hi[i:j] = [hi]

    def add_all(self, values: list[int]) -> None:
        run_lo = run_hi = None
        for value in sorted(values):
            if run_hi is not None and value == run_hi + 1:
                run_hi = value
                continue
            if run_lo is not None and run_hi is not None:
                self.add(run_lo, run_hi)
            run_lo = run_hi = value
        if run_lo is not None and run_hi is not None:
            self.add(run_lo, run_hi)

    def discard(self, lo: int, hi: int) -> None:
        """Removes [lo, hi]."""
        i = bisect.bisect_left(self._hi, lo)
        j = bisect.bisect_right(self._lo, hi)
        if i >= j:
            return
        keep_lo: list[int] = []
        keep_hi: list[int] = []
        if self._lo[i] < lo:
            keep_lo.append(self._lo[i])
            keep_hi.append(lo - 1)
        if self._hi[j - 1] > hi:
            keep_lo.append(hi + 1)
            keep_hi.append(self._hi[j - 1])
        self._lo[i:j] = keep_lo
        self._hi[i:j] = keep_hi


async def scan_msg_ids(
    js: JetStreamContext,
    stream: str,
    subject: str,
    end_seq: int,
    on_ids: Callable[[list[str]], Awaitable[None]],
    *,
    start_seq: int | None = None,
    start_time_s: float | None = None,
    batch: int = 1000,
) -> int:
    """Reads the ``Nats-Msg-Id`` of every message of ``stream`` from a position up to ``end_seq``.

    Headers only (payloads are not transferred), through an ephemeral pull consumer; ``on_ids``
    receives the ids batch by batch. Returns how many messages were read.
    """
    if start_seq is not None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq)
        )
    elif start_time_s is not None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=datetime.fromtimestamp(max(0.0, start_time_s), tz=UTC),
        )
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    config.ack_policy = AckPolicy.NONE
    config.headers_only = True
    config.mem_storage = True
    config.inactive_threshold = 30.0
    config.max_waiting = 1
    psub = await js.pull_subscribe(subject, stream=stream, config=config)
    read = 0
    try:
        info = await psub.consumer_info()
        while info.num_pending:
            msgs = await fetch_batch(psub, batch, timeout_s=2.0)
            if not msgs:
                # Nothing (more) at or after the start position within the window we want.
                break
            ids: list[str] = []
            done = False
            for msg in msgs:
                meta = msg.metadata
                if meta.sequence.stream > end_seq:
                    done = True
                    break
                read += 1
                msg_id = msg.headers.get(MSG_ID_HEADER) if msg.headers else None
                if msg_id:
                    ids.append(msg_id)
                if meta.sequence.stream == end_seq or meta.num_pending == 0:
                    done = True
                    break
            if ids:
                await on_ids(ids)
            if done:
                break
    finally:
        try:
            await psub.unsubscribe()
        except Exception:  # the consumer expires on its own (inactive_threshold)
            logger.debug("could not unsubscribe the scan consumer", exc_info=True)
    return read


class Reconciler:
    """Decides which outbox events may be (re)published blindly and scans the stream for the rest."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        subject: str,
        mark_found: Callable[[list[str]], Awaitable[int]],
        *,
        window_s: float,
        margin_s: float,
        clock_skew_s: float,
        never_sent: RangeSet | None = None,
    ) -> None:
        self.js = js
        self.stream = stream
        self.subject = subject
        self.mark_found = mark_found
        self.window_s = window_s
        self.margin_s = margin_s
        self.clock_skew_s = clock_skew_s
        #: Seqs this process stored while NATS was unreachable and has not sent since: no copy exists.
        self.never_sent = never_sent if never_sent is not None else RangeSet()
        #: Every stream message stored at or after ``scan_floor_s`` and up to ``scanned_through`` was read.
        self.scan_floor_s: float | None = None
        self.scanned_through = 0
        #: Wall time at which the last scan read the stream's last sequence.
        self.scan_started_s = 0.0

    def safe(self, event: OutboxEvent, now_s: float | None = None) -> bool:
        """True when publishing ``event`` now cannot put a second copy into the stream."""
        if event.seq in self.never_sent:
            return True
        now = time.time() if now_s is None else now_s
        earliest_copy = event.received_at_us / 1e6
        if self.scan_floor_s is not None and earliest_copy - self.clock_skew_s >= self.scan_floor_s:
            earliest_copy = max(earliest_copy, self.scan_started_s)
        return now - earliest_copy < self.window_s - self.margin_s

    async def scan(self, oldest_received_at_us: int) -> int:
        """Marks published every outbox event already in the stream; returns how many were found."""
        start_time = oldest_received_at_us / 1e6 - self.clock_skew_s
        started = time.time()
        info = await self.js.stream_info(self.stream)
        end_seq = int(info.state.last_seq or 0)
        found = 0

        async def on_ids(ids: list[str]) -> None:
            nonlocal found
            found += await self.mark_found(ids)

        if self.scan_floor_s is None or start_time < self.scan_floor_s:
            read = await scan_msg_ids(
                self.js, self.stream, self.subject, end_seq, on_ids, start_time_s=start_time
            )
            self.scan_floor_s = start_time
        elif end_seq > self.scanned_through:
            read = await scan_msg_ids(
                self.js, self.stream, self.subject, end_seq, on_ids, start_seq=self.scanned_through + 1
            )
        else:
            read = 0
        self.scanned_through = max(self.scanned_through, end_seq)
        self.scan_started_s = started
        metrics.RECONCILE_SCANNED.inc(read)
        metrics.RECONCILED.inc(found)
        logger.info(
            "reconciled the outbox against %s: read %d messages up to seq %d, %d events were already there",
            self.stream,
            read,
            end_seq,
            found,
        )
        return found
