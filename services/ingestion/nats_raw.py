"""Writing already-encoded NATS protocol commands straight into nats-py's outgoing buffer.

This is the one place freshrec touches a private nats-py API, and why: ``Client.publish``
re-validates the subject and every header name and formats each header block per message, which
at tens of thousands of events a second costs more than the rest of ingestion's publish path. The
publisher instead encodes a whole batch of ``HPUB`` commands itself (the documented client
protocol) and hands them over at once through ``Client._send_command`` and
``Client._flush_pending``, the two methods ``publish`` itself ends with.

nats-py may rename or change them in any release: ``raw_sender`` then answers None and callers
fall back to ``Client.publish`` (slower, still correct), and ``tests/ingestion/test_nats_raw.py``
fails, so an upgrade cannot lose the fast path silently.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NatsClient

#: Writes complete protocol commands (``data``) to the connection and flushes them.
RawSender = Callable[[bytes], Awaitable[None]]


def raw_sender(nc: NatsClient) -> RawSender | None:
    """The client's raw writer, or None when this nats-py no longer has the private methods."""
    send_command = getattr(nc, "_send_command", None)
    flush_pending = getattr(nc, "_flush_pending", None)
    if send_command is None or flush_pending is None:
        return None

    async def send(data: bytes) -> None:
        await send_command(data)
        await flush_pending()

    return send
