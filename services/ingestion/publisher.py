"""Publishing committed events to JetStream FRESHREC_EVENTS.

Every event is published with ``Nats-Msg-Id = event_id`` on ``freshrec.events.accepted.<type>``,
pipelined: a batch goes out in one burst, each message with its own reply subject under one
wildcard inbox, and the acknowledgements are counted as they arrive instead of being awaited
one by one. Acknowledged events are marked published by the next group commit; the rest stay in
the outbox for the relay (``relay.py``).

The publisher also knows whether the publish path works: NATS connected and the last batch
acknowledged. While it does not, requests are still accepted (the SQL log is durable) and the
events wait in the outbox; health reports it (``PUBLISHER_HEALTH``) and so do the metrics.

Events of a forgotten user are never sent: ``forgotten`` (the tombstones) is asked right before
the batch goes out, so an event read from the outbox (or committed) before this replica knew the
tombstone is dropped instead of reaching the stream after ingestion erased the user from it (the
eraser deletes its row from the event log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Callable, Sequence

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from freshrec.v1 import event_pb2
from services.ingestion import metrics
from services.ingestion.nats_raw import raw_sender
from services.ingestion.reconcile import RangeSet
from services.ingestion.store import OutboxEvent
from services.ingestion.writer import GroupCommitter
from shared.nats import EVENT_PARTITIONS, EVENTS_STREAM, MSG_ID_HEADER, RECEIVED_HEADER, accepted_subject

logger = logging.getLogger(__name__)

#: Named health service that is SERVING while accepted events are published as they arrive.
PUBLISHER_HEALTH = "freshrec.ingestion.Publisher"
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"


def _subjects_by_partition(type_name: str) -> list[str]:
    # accepted_subject computes the partition from a user id; read the subject's prefix from it once.
    prefix = accepted_subject(type_name, "").rsplit(".", 1)[0]
    return [f"{prefix}.{p}" for p in range(EVENT_PARTITIONS)]


#: ``SUBJECTS[type][partition]``: every subject an accepted event can go to, built once.
SUBJECTS = {
    value.number: _subjects_by_partition(value.name)
    for value in event_pb2.EventType.DESCRIPTOR.values
    if value.number != event_pb2.EVENT_TYPE_UNSPECIFIED
}


SUBJECT_BYTES = {kind: [subject.encode() for subject in subjects] for kind, subjects in SUBJECTS.items()}


def subject_for(event: OutboxEvent) -> str:
    """``freshrec.events.accepted.<type>.<user partition>`` (as ``shared.nats.accepted_subject``)."""
    return SUBJECTS[event.type][zlib.crc32(event.user_id.encode()) % EVENT_PARTITIONS]


class _Capacity:
    """Bounds how many events wait for acknowledgements at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        n = min(n, self.limit)
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n

    async def release(self, n: int) -> None:
        n = min(n, self.limit)
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


class _Batch:
    """The acknowledgements of one published batch."""

    __slots__ = ("acked", "failed", "remaining", "done", "error")

    def __init__(self, size: int, done: asyncio.Future[None]) -> None:
        self.acked: list[int] = []
        self.failed = 0
        self.remaining = size
        self.done = done
        self.error: str | None = None


class Publisher:
    """Publishes outbox events and keeps track of which are in flight."""

    def __init__(
        self,
        committer: GroupCommitter,
        *,
        timeout_s: float,
        max_in_flight: int,
        stream: str = EVENTS_STREAM,
        forgotten: Callable[[str], bool] | None = None,
    ) -> None:
        self.committer = committer
        #: Whether a user is forgotten (tombstoned): their events are dropped, never published.
        self.forgotten = forgotten
        self.timeout_s = timeout_s
        self.stream = stream
        self.nc: NatsClient | None = None
        #: Seqs being published, or acknowledged and waiting for their mark to commit; the relay skips them.
        self.in_flight: set[int] = set()
        #: Seqs stored while NATS was unreachable and never sent since (see reconcile.py).
        self.never_sent = RangeSet()
        #: True after a batch went unacknowledged, until an acknowledgement arrives again.
        self.stalled = False
        self._capacity = _Capacity(max_in_flight)
        self._next_token = 1
        self._marked: list[int] = []
        self._waiting: dict[int, tuple[_Batch, int]] = {}
        self._prefix = ""
        self._sub: Subscription | None = None
        self._background: set[asyncio.Task[int]] = set()

    async def attach(self, nc: NatsClient) -> None:
        """Starts publishing over ``nc``: one wildcard subscription receives every acknowledgement."""
        self._prefix = nc.new_inbox()
        self._sub = await nc.subscribe(f"{self._prefix}.*", cb=self._on_ack, pending_msgs_limit=1_000_000)
        self.nc = nc

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def serving(self) -> bool:
        return self.connected and not self.stalled

    # -- callbacks from the group committer (on the event loop) ---------------------------------

    def committed(self, events: list[OutboxEvent], abandoned: bool) -> None:
        """New events were committed: they are in flight from now on (the relay leaves them alone)."""
        self.in_flight.update(e.seq for e in events)
        if abandoned and events:
            self.publish_in_background(events)

    def publish_in_background(self, events: Sequence[OutboxEvent]) -> asyncio.Task[int]:
        """Publishes committed events in a task of its own, which finishes even if the request is gone."""
        task = asyncio.get_running_loop().create_task(self.publish(events, "request"))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def marked(self, seqs: list[int]) -> None:
        """Their published marks are committed: a read of the outbox started from now on skips them.

        They stay in ``in_flight`` until the relay starts its next read (``release_marked``): a read
        already under way may have seen them still unpublished.
        """
        self._marked.extend(seqs)

    def forget_never_sent(self) -> None:
        """This replica's outbox may have been taken over (its heartbeat lapsed): what it knew about
        never-sent events is no longer its own to trust."""
        self.never_sent.clear()

    def release_marked(self) -> None:
        """Called by the relay before it reads the outbox."""
        if self._marked:
            self.in_flight.difference_update(self._marked)
            self._marked = []

    # -- publishing -----------------------------------------------------------------------------

    async def publish(self, events: Sequence[OutboxEvent], path: str) -> int:
        """Publishes events (already in ``in_flight``) in order; returns how many were acknowledged.

        Never raises for NATS trouble: what is not acknowledged is left to the relay.
        """
        if not events:
            return 0
        nc = self.nc
        if nc is None or not nc.is_connected or (self.stalled and path == "request"):
            # Not sent at all: the relay publishes these (and probes a stalled server meanwhile),
            # so a request is not held up by a NATS that does not answer.
            if path == "request":
                self.never_sent.add_all([e.seq for e in events])
            self._give_up(events, path)
            return 0
        if path == "relay":
            self.never_sent.discard(events[0].seq, events[-1].seq)
        batch = _Batch(len(events), asyncio.get_running_loop().create_future())
        sending: Sequence[OutboxEvent] = events
        first = self._next_token
        self._next_token += len(events)
        started = time.perf_counter()
        acquired = False
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._capacity.acquire(len(events))
                acquired = True
                # Asked as late as possible: nothing between this and the send waits.
                sending = self._drop_forgotten(events)
                batch.remaining = len(sending)
                waiting = self._waiting
                for token, event in enumerate(sending, first):
                    waiting[token] = (batch, event.seq)
                if sending:
                    await self._send(nc, sending, first)
                    await batch.done
        except TimeoutError:
            logger.warning(
                "JetStream acknowledged %d of %d events within %.1fs; the relay will retry the rest",
                len(batch.acked),
                len(events),
                self.timeout_s,
            )
        except Exception as exc:
            logger.warning("publishing %d events failed (%s); the relay will retry them", len(events), exc)
        finally:
            for token in range(first, first + len(events)):
                self._waiting.pop(token, None)
            if acquired:
                await self._capacity.release(len(events))
        if batch.error is not None:
            logger.warning("JetStream refused %d of %d events: %s", batch.failed, len(events), batch.error)
        acked = batch.acked
        if acked:
            metrics.PUBLISH_LATENCY.observe(time.perf_counter() - started)
            metrics.PUBLISHED.labels(path).inc(len(acked))
            self.committer.mark_published(acked)
            self.stalled = False
        if len(acked) < len(sending):
            if batch.remaining or not acked:
                self.stalled = True  # unanswered (or refused outright): the path does not work
            done = set(acked)
            self._give_up([e for e in sending if e.seq not in done], path)
        return len(acked)

    def _drop_forgotten(self, events: Sequence[OutboxEvent]) -> Sequence[OutboxEvent]:
        """The events to send: those of forgotten users are left out (and out of ``in_flight``;
        their rows are the eraser's to delete, and the relay skips them again meanwhile)."""
        forgotten = self.forgotten
        if forgotten is None:
            return events
        dropped = [e for e in events if forgotten(e.user_id)]
        if not dropped:
            return events
        metrics.FORGOTTEN_EVENTS.labels("outbox").inc(len(dropped))
        self.in_flight.difference_update(e.seq for e in dropped)
        logger.info("%d unpublished events of forgotten users dropped instead of published", len(dropped))
        return [e for e in events if not forgotten(e.user_id)]

    async def _send(self, nc: NatsClient, events: Sequence[OutboxEvent], first_token: int) -> None:
        """Writes one HPUB per event, each replying to its own token under the acknowledgement inbox.

        The commands for the whole batch are encoded here and handed to the client's outgoing buffer
        at once (``nats_raw.py`` says why); falls back to ``Client.publish`` if the client's
        buffer interface is not there.
        """
        send = raw_sender(nc)
        if send is None:
            for token, event in enumerate(events, first_token):
                await nc.publish(
                    subject_for(event),
                    event.payload,
                    reply=f"{self._prefix}.{token}",
                    headers={
                        MSG_ID_HEADER: event.event_id,
                        EXPECTED_STREAM_HEADER: self.stream,
                        RECEIVED_HEADER: str(event.received_at_us),
                    },
                )
            return
        reply = self._prefix.encode() + b"."
        stream_header = b"\r\n" + EXPECTED_STREAM_HEADER.encode() + b": " + self.stream.encode() + b"\r\n"
        received_header = RECEIVED_HEADER.encode() + b": "
        subjects = SUBJECT_BYTES
        crc32 = zlib.crc32
        parts: list[bytes] = []
        append = parts.append
        for token, event in enumerate(events, first_token):
            header = (
                b"NATS/1.0\r\nNats-Msg-Id: "
                + event.event_id.encode()
                + stream_header
                + received_header
                + b"%d\r\n\r\n" % event.received_at_us
            )
            payload = event.payload
            user = event.user_id.encode()
            append(
                b"HPUB %s %s%d %d %d\r\n%s%s\r\n"
                % (
                    subjects[event.type][crc32(user) % EVENT_PARTITIONS],
                    reply,
                    token,
                    len(header),
                    len(header) + len(payload),
                    header,
                    payload,
                )
            )
        await send(b"".join(parts))

    def _give_up(self, events: Sequence[OutboxEvent], path: str) -> None:
        metrics.PUBLISH_FAILED.labels(path).inc(len(events))
        self.in_flight.difference_update(e.seq for e in events)

    async def _on_ack(self, msg: Msg) -> None:
        try:
            token = int(msg.subject[len(self._prefix) + 1 :])
        except ValueError:
            return
        entry = self._waiting.pop(token, None)
        if entry is None:
            return  # a late acknowledgement of a batch that timed out; the relay handles its event
        batch, seq = entry
        data = msg.data
        if data and not data.startswith(b'{"error"') and b'"error":' not in data:
            batch.acked.append(seq)
        else:
            batch.failed += 1
            if batch.error is None:
                status = msg.headers.get("Status") if msg.headers else None
                batch.error = data.decode(errors="replace")[:300] if data else f"status {status}"
        batch.remaining -= 1
        if batch.remaining == 0 and not batch.done.done():
            batch.done.set_result(None)
