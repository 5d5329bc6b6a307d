"""Pulling batches from a JetStream pull consumer at a low cost per message.

nats-py's ``PullSubscription.fetch`` awaits every message of a batch under ``wait_for`` (a task
per message) and its ``Msg.metadata`` builds a datetime per message; at tens of thousands of
events a second that is most of the feature service's CPU. ``Puller`` speaks the documented
pull protocol itself: one pull request at a time (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``
for up to ``batch`` messages, lingering up to ``wait_s``) with the reply subject of a private
inbox, whose deliveries a plain subscription collects. ``fetch`` returns whatever has arrived
as soon as anything has, while the request keeps delivering; a new request goes out when the
previous one is used up (its batch delivered) or ended by the server (``408 Request Timeout``
when it expires). A steady stream thus costs one request per batch, a backlog arrives in
batches, and an idle consumer sends one request per ``wait_s``.
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
    """Fetches from one pull consumer (bound by name) through a private inbox."""

    def __init__(self, nc: NatsClient, stream: str, consumer: str) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = nc.new_inbox()
        self.buffer: deque[Msg] = deque()
        self._remaining = 0  # messages the open request may still deliver (0: no open request)
        self._deadline = 0.0  # when the open request must have ended, at the latest
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
            self._remaining = 0
        else:
            self.buffer.append(msg)
            self._remaining -= 1
        self._wake.set()

    async def fetch(self, batch: int, wait_s: float) -> list[Msg]:
        """Up to ``batch`` messages, as soon as any has arrived; waits up to ``wait_s`` for one."""
        loop = asyncio.get_running_loop()
        if not self.buffer:
            if self._remaining > 0 and loop.time() > self._deadline:
                logger.warning(
                    "pull request on %s was never ended by the server; sending another", self.subject
                )
                self._remaining = 0
            if self._remaining <= 0:
                self._remaining = batch
                self._deadline = loop.time() + wait_s + SAFETY_S
                request = {"batch": batch, "expires": max(1, int(wait_s * 1e9))}
                await self.nc.publish(self.subject, json.dumps(request).encode(), reply=self.inbox)
            try:
                async with asyncio.timeout(wait_s + SAFETY_S):
                    while not self.buffer and self._remaining > 0:
                        self._wake.clear()
                        await self._wake.wait()
            except TimeoutError:
                pass
        if self._error is not None:
            error, self._error = self._error, None
            raise ConsumerGone(f"pull from {self.subject} failed: {error}")
        n = min(batch, len(self.buffer))
        return [self.buffer.popleft() for _ in range(n)]
