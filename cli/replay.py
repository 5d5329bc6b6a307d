"""Streaming a list of events through ingestion in order, at full speed or at a given rate."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cli.clients import call
from freshrec.v1 import event_pb2, ingestion_pb2, ingestion_pb2_grpc
from shared.security import make_channel
from shared.settings import PeerSettings


@dataclass
class ReplaySummary:
    """What a replay did, for the final summary."""

    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


def reason_kind(reason: str) -> str:
    """Groups reasons that differ only in the values they quote (``occurred_at 1997-… is before …``)."""
    return reason.split(":")[0].split(" (")[0][:80]


async def stream_events(
    events: Sequence[event_pb2.Event],
    addresses: Sequence[str],
    *,
    rate: float = 0.0,
    batch: int = 500,
    in_flight: int = 1,
    timeout_s: float = 60.0,
    on_progress: Callable[[int], None] | None = None,
    peer: PeerSettings | None = None,
) -> ReplaySummary:
    """Sends ``events`` in batches through ``IngestEvents``, round-robin over ingestion replicas.

    ``rate`` > 0 paces sending to that many events per second; 0 sends as fast as ingestion
    answers. With ``in_flight`` 1 (the default) batches reach ingestion in order, so the stream
    keeps the file's time order.
    """
    if batch <= 0 or in_flight <= 0:
        raise ValueError("batch and in_flight must be positive")
    if rate > 0:
        batch = max(1, min(batch, int(rate / 10)))  # about ten sends a second, not bursts
    summary = ReplaySummary()
    channels = [make_channel(a, peer or PeerSettings()) for a in addresses]
    stubs = [ingestion_pb2_grpc.IngestionServiceStub(c) for c in channels]
    targets = itertools.cycle(range(len(stubs)))
    slots = asyncio.Semaphore(in_flight)
    start = time.monotonic()

    async def send(chunk: Sequence[event_pb2.Event], target: int) -> None:
        try:
            request = ingestion_pb2.IngestEventsRequest(events=chunk)
            response = await call(
                "ingestion",
                addresses[target],
                stubs[target].IngestEvents(request, timeout=timeout_s),
            )
            summary.accepted += response.accepted
            summary.duplicates += response.duplicates
            summary.rejected += len(response.errors)
            for error in response.errors:
                summary.reasons[reason_kind(error.reason)] += 1
            summary.sent += len(chunk)
            if on_progress is not None:
                on_progress(len(chunk))
        finally:
            slots.release()

    pending: set[asyncio.Task[None]] = set()
    try:
        for offset in range(0, len(events), batch):
            chunk = events[offset : offset + batch]
            if rate > 0:
                due = start + offset / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await slots.acquire()
            failed = [t for t in pending if t.done() and t.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]  # not None: filtered above
            task = asyncio.create_task(send(chunk, next(targets)))
            pending.add(task)
            task.add_done_callback(lambda t: pending.discard(t) if t.exception() is None else None)
        if pending:
            await asyncio.gather(*pending)
    finally:
        for task in pending:
            task.cancel()
        for channel in channels:
            await channel.close()
        summary.elapsed_s = time.monotonic() - start
    return summary
