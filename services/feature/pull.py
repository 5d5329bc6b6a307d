"""Pulling batches from a JetStream pull consumer at a low cost per message.

nats-py's ``PullSubscription.fetch`` awaits every message of a batch under ``wait_for`` (a task
per message) and its ``Msg.metadata`` builds a datetime per message; at tens of thousands of
events a second that is most of the feature service's CPU. ``Puller`` speaks the documented
pull protocol itself (a request on ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`` with the
reply subject of a private inbox) and collects the deliveries from a plain subscription:

1. a ``no_wait`` request for the batch returns what is available now (the server ends it with
   a ``404 No Messages`` status when it has fewer);
2. if nothing was available, a request for one message that lingers up to ``wait_s`` waits for
   the next event (ended by ``408 Request Timeout``), and a ``no_wait`` request then collects
   whatever else has arrived.

Deliveries that arrive after a fetch returned (possible only if the server answers later
than our safety deadline) stay buffered, in order, for the next fetch.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

logger = logging.getLogger(__name__)

#: Extra time given to the server to end a request before the client stops waiting for it.
SAFETY_S = 5.0


def raise_if_cancelling() -> None:
    """Raises CancelledError if this task was asked to stop.

    Python 3.11's ``asyncio.wait_for`` (inside every nats-py request) can swallow a cancellation
    that races with the answer it awaits; the task still counts the request, so every loop of
    the feature service checks it, and a stop never waits forever on a loop that missed it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class ConsumerGone(RuntimeError):
    """The server answered a pull with a status that means the consumer cannot be used (409)."""


def stream_position(reply: str) -> tuple[int, int]:
    """(stream sequence, stream timestamp in ns) from a JetStream delivery's reply subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` or, with a domain
    and account hash, ``$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>
    .<ts>.<pending>[.<token>]``.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[7])
    if len(tokens) >= 11:
        return int(tokens[7]), int(tokens[9])
    raise ValueError(f"not a JetStream delivery reply subject: {reply!r}")


def pending_after(reply: str) -> int:
    """How many messages the consumer still had pending after this delivery."""
    tokens = reply.split(".")
    return int(tokens[8] if len(tokens) == 9 else tokens[10])


class Puller:
    """Fetches batches from one pull consumer (bound by name) through a private inbox."""

    def __init__(self, nc: NatsClient, stream: str, consumer: str) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = nc.new_inbox()
        self.buffer: deque[Msg] = deque()
        self._ended = 0  # pull requests the server ended with a status message
        self._wake = asyncio.Event()
        self._error: str | None = None
        self._sub: Subscription | None = None

    async def start(self) -> Puller:
        self._sub = await self.nc.subscribe(self.inbox, cb=self._on_msg)
        return self

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.data and msg.headers and "Status" in msg.headers:
            status = msg.headers["Status"]
            if status == "100":  # idle heartbeat or flow control: not an end
                return
            if status not in ("404", "408"):
                self._error = f"{status} {msg.headers.get('Description', '')}".strip()
            self._ended += 1
        else:
            self.buffer.append(msg)
        self._wake.set()

    async def _request(self, batch: int, linger_s: float | None) -> None:
        """Sends one pull request and waits until it is satisfied or ended."""
        want = len(self.buffer) + batch
        ended = self._ended
        request: dict[str, object] = {"batch": batch}
        if linger_s is None:
            request["no_wait"] = True
        else:
            request["expires"] = max(1, int(linger_s * 1e9))
        await self.nc.publish(self.subject, json.dumps(request).encode(), reply=self.inbox)
        try:
            async with asyncio.timeout((linger_s or 0.0) + SAFETY_S):
                while len(self.buffer) < want and self._ended == ended:
                    self._wake.clear()
                    await self._wake.wait()
        except TimeoutError:
            logger.warning("pull request on %s got no answer in time; continuing", self.subject)
        if self._error is not None:
            error, self._error = self._error, None
            raise ConsumerGone(f"pull from {self.subject} failed: {error}")

    async def fetch(self, batch: int, wait_s: float) -> list[Msg]:
        """Up to ``batch`` messages, waiting up to ``wait_s`` for the first when none is ready."""
        if not self.buffer:
            await self._request(batch, None)
        if not self.buffer:
            await self._request(1, wait_s)
            if self.buffer and batch > 1:
                await self._request(batch - 1, None)
        n = min(batch, len(self.buffer))
        return [self.buffer.popleft() for _ in range(n)]
