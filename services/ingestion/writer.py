"""Group commit: one thread writes to the event log, many requests share each transaction.

Requests hand their validated events to ``GroupCommitter.insert`` and await the result. The
writer thread takes everything waiting (up to ``max_rows``) into one transaction, so concurrent
requests pay for one commit (one fsync) between them, and while it commits, the next group
gathers. Marks of published events ride along in the same transactions (or in their own after a
short delay when no inserts come), so marking never costs a commit of its own under load, and the
heartbeat of this replica does too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.ingestion import metrics
from services.ingestion.store import EventLog, NewEvent, OutboxEvent

logger = logging.getLogger(__name__)

# How long a stop keeps retrying the last publish marks against an unreachable database.
STOP_RETRY_S = 5.0


@dataclass
class Heartbeat:
    """How this replica renews its registration: every ``interval_s``; ``on_lapse`` runs (on the
    event loop) when a renewal comes more than ``lease_s`` after the previous one."""

    replica_id: str
    name: str
    interval_s: float
    lease_s: float
    on_lapse: Callable[[], None] | None = None


@dataclass
class _Pending:
    rows: Sequence[NewEvent]
    future: asyncio.Future[list[OutboxEvent]]


class GroupCommitter:
    """The single writer of the event log for this process."""

    def __init__(
        self,
        log: EventLog,
        *,
        max_rows: int = 20_000,
        mark_delay_s: float = 0.05,
        heartbeat: Heartbeat | None = None,
        on_committed: Callable[[list[OutboxEvent], bool], None] | None = None,
        on_marked: Callable[[list[int]], None] | None = None,
    ) -> None:
        """``heartbeat`` renews this replica's registration; ``on_committed(events, abandoned)`` runs on
        the event loop for every group's new events before the awaiting request resumes (the
        publisher marks them in flight there; ``abandoned`` says the request stopped waiting, so the
        publisher must publish them itself); ``on_marked`` runs on the loop with the seqs whose
        marks were committed."""
        self.log = log
        self.max_rows = max_rows
        self.mark_delay_s = mark_delay_s
        self.heartbeat = heartbeat
        self.on_committed = on_committed
        self.on_marked = on_marked
        self._inserts: deque[_Pending] = deque()
        self._marks: list[int] = []
        self._marks_since = 0.0
        self._last_heartbeat = 0.0
        self._last_ok_heartbeat = 0.0
        self._registered_again = False
        self._cond = threading.Condition()
        self._stopping = False
        self._stop_deadline = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="ingestion-writer", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Commits what is waiting, then ends the thread."""
        with self._cond:
            self._stopping = True
            self._stop_deadline = time.monotonic() + STOP_RETRY_S
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def insert(self, rows: Sequence[NewEvent]) -> asyncio.Future[list[OutboxEvent]]:
        """Queues rows for the next group commit; the future gives the new (non-duplicate) ones."""
        assert self._loop is not None, "GroupCommitter.start() first"
        future: asyncio.Future[list[OutboxEvent]] = self._loop.create_future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the event log writer is stopping")
            self._inserts.append(_Pending(rows, future))
            self._cond.notify()
        return future

    def mark_published(self, seqs: Sequence[int]) -> None:
        """Records that JetStream acknowledged these events; committed with the next transaction."""
        if not seqs:
            return
        with self._cond:
            if not self._marks:
                self._marks_since = time.monotonic()
            self._marks.extend(seqs)
            self._cond.notify()

    @property
    def waiting_rows(self) -> int:
        with self._cond:
            return sum(len(p.rows) for p in self._inserts)

    # -- the writer thread ----------------------------------------------------------------------

    def _due(self, now: float) -> bool:
        if self._inserts or self._stopping:
            return True
        if self._marks and now - self._marks_since >= self.mark_delay_s:
            return True
        return bool(self.heartbeat and now - self._last_heartbeat >= self.heartbeat.interval_s)

    def _wait_s(self, now: float) -> float:
        waits = [1.0]
        if self._marks:
            waits.append(self._marks_since + self.mark_delay_s - now)
        if self.heartbeat:
            waits.append(self._last_heartbeat + self.heartbeat.interval_s - now)
        return max(0.0, min(waits))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due(time.monotonic()):
                    self._cond.wait(self._wait_s(time.monotonic()))
                batch: list[_Pending] = []
                rows = 0
                while self._inserts and (not batch or rows + len(self._inserts[0].rows) <= self.max_rows):
                    pending = self._inserts.popleft()
                    batch.append(pending)
                    rows += len(pending.rows)
                marks, self._marks = self._marks, []
                stopping = self._stopping and not self._inserts and not marks
            now = time.monotonic()
            heartbeat = None
            if self.heartbeat and now - self._last_heartbeat >= self.heartbeat.interval_s:
                heartbeat = (self.heartbeat.replica_id, self.heartbeat.name, int(time.time() * 1e6))
            if batch or marks or heartbeat:
                if self._commit(batch, marks, heartbeat, rows) and heartbeat:
                    self._renewed(now)
            if stopping:
                return

    def _renewed(self, now: float) -> None:
        assert self.heartbeat is not None
        lapsed = self._last_ok_heartbeat and now - self._last_ok_heartbeat > self.heartbeat.lease_s
        self._last_heartbeat = self._last_ok_heartbeat = now
        if (lapsed or self._registered_again) and self.heartbeat.on_lapse is not None:
            # Other replicas may have taken this one for dead and taken over its outbox meanwhile.
            logger.warning("this replica's heartbeat lapsed; its outbox may have been taken over")
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self.heartbeat.on_lapse)
        self._registered_again = False

    def _commit(
        self, batch: list[_Pending], marks: list[int], heartbeat: tuple[str, str, int] | None, rows: int
    ) -> bool:
        """Runs one transaction; returns whether it committed."""
        started = time.perf_counter()
        try:
            stored, self._registered_again = self.log.commit([p.rows for p in batch], marks, heartbeat)
        except Exception as exc:
            logger.exception("group commit of %d events failed", rows)
            if marks:
                with self._cond:
                    if self._stopping and time.monotonic() >= self._stop_deadline:
                        # Marks are only bookkeeping: unmarked events are found in the stream by the
                        # relay's reconciler on the next start, so giving up here loses nothing.
                        logger.warning(
                            "stopping without recording %d publish marks: the event log is unreachable",
                            len(marks),
                        )
                    else:  # keep them for the next transaction
                        self._marks[:0] = marks
                        self._marks_since = time.monotonic()
            if batch:
                self._resolve(batch, None, exc)
            return False
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        if batch:
            metrics.COMMIT_ROWS.observe(rows)
            self._resolve(batch, stored, None)
        if marks and self.on_marked is not None:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self.on_marked, marks)
        return True

    def _resolve(
        self, batch: list[_Pending], stored: list[list[OutboxEvent]] | None, exc: BaseException | None
    ) -> None:
        def settle() -> None:
            for index, pending in enumerate(batch):
                if exc is not None:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                    continue
                assert stored is not None
                new = stored[index]
                abandoned = pending.future.done()  # the request was cancelled while waiting
                if self.on_committed is not None:
                    self.on_committed(new, abandoned)
                if not abandoned:
                    pending.future.set_result(new)

        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:
            logger.warning("event loop closed before %d committed groups were handed back", len(batch))
