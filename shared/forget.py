"""Carrying out forget requests: every service's share of ``IngestionService.ForgetUser``.

Ingestion publishes one ``ForgetTask`` per request on ``freshrec.forget.requests`` (stream
``FRESHREC_FORGET``). Each service (each feature and inference replica) consumes it with a durable
consumer of its own, so a service that is down does its part when it comes back: the task stays
unacknowledged until the service's ``handle`` says it is done, then a ``ForgetReport`` goes out on
``freshrec.forget.progress.<request id>.<service>`` and the task is acknowledged. ``handle`` must
be idempotent: a redelivery (a crash between the effect and the ack) runs it again and must change
nothing more. A ``handle`` that cannot finish yet (a peer still holds the user, its consumer has not
caught up) returns None and gets the task again after ``retry_s``.

Which replicas a request waits for is JetStream's own record: every worker's durable consumer
carries its service and (unless the replicas of a service share one consumer) its replica in the
consumer's metadata, and has an ``inactive_threshold``, so the consumer of a replica that went away
is removed by the server once it has not pulled for that long (``live_replicas``). A replica that
does not run a worker (a standby trainer) has no consumer and is not waited for.

Nothing here logs the user id; reports name the request, the service and the replica only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError

from freshrec.v1 import ingestion_pb2
from shared.nats import (
    FORGET_PROGRESS_STREAM,
    FORGET_PROGRESS_SUBJECTS,
    FORGET_STREAM,
    FORGET_TASKS_SUBJECT,
    MSG_ID_HEADER,
    ensure_stream,
    fetch_batch,
    forget_progress_subject,
    kept_stream_config,
)
from shared.supervise import forever, raise_if_cancelling

logger = logging.getLogger(__name__)

#: How long progress reports are kept (they hold no personal data; ingestion has them in SQL).
PROGRESS_MAX_AGE_S = 30 * 24 * 3600.0

#: What a service's share of a forget request is: a description of what it erased (no personal
#: data) once done, None when it cannot finish yet.
Handler = Callable[[ingestion_pb2.ForgetTask], Awaitable[str | None]]

#: Metadata keys of a forget worker's durable consumer on FRESHREC_FORGET.
SERVICE_METADATA = "freshrec-service"
REPLICA_METADATA = "freshrec-replica"


@dataclass(frozen=True)
class LiveReplica:
    """A forget worker JetStream still has a consumer for. ``replica`` is None when the replicas of
    the service share the consumer (any one of them reporting is that consumer's report)."""

    service: str
    replica: str | None
    durable: str


async def live_replicas(js: JetStreamContext) -> list[LiveReplica]:
    """The forget workers whose durable consumers on FRESHREC_FORGET exist now (a departed replica's
    consumer is gone once its inactive threshold passed). Consumers without our metadata (made by a
    release before it, or by hand) are not counted."""
    try:
        infos = await js.consumers_info(FORGET_STREAM)
    except NotFoundError:
        return []
    live = []
    for info in infos:
        metadata = info.config.metadata or {}
        service = metadata.get(SERVICE_METADATA)
        if not service or not info.name:
            continue
        live.append(LiveReplica(service, metadata.get(REPLICA_METADATA) or None, info.name))
    return live


async def ensure_forget_streams(js: JetStreamContext, replicas: int = 1, *, owner: bool = False) -> None:
    """Declares ``FRESHREC_FORGET`` (tasks kept until erased) and ``FRESHREC_FORGET_PROGRESS``;
    ingestion owns both, the other services declare them so they can start first."""
    tasks = kept_stream_config(FORGET_STREAM, FORGET_TASKS_SUBJECT, replicas=replicas)
    progress = kept_stream_config(
        FORGET_PROGRESS_STREAM, FORGET_PROGRESS_SUBJECTS, replicas=replicas, max_age_s=PROGRESS_MAX_AGE_S
    )
    for config in (tasks, progress):
        await ensure_stream(js, config, update=owner)


def report_id(request_id: str, service: str, replica: str) -> str:
    """The idempotency key of a report: one per request, service and replica."""
    return f"{request_id}.{service}.{replica}"


class ForgetWorker:
    """Consumes ``FRESHREC_FORGET`` with the durable consumer ``durable`` and runs ``handle`` on
    every task, reporting each one done as ``service`` / ``replica``. ``shared``: the replicas of
    the service share ``durable`` (one of them does each task), so the consumer names no replica.
    ``inactive_s``: JetStream removes the consumer once nobody pulled from it for that long."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        service: str,
        replica: str,
        durable: str,
        handle: Handler,
        retry_s: float = 2.0,
        ack_wait_s: float = 30.0,
        stream_replicas: int = 1,
        inactive_s: float = 120.0,
        shared: bool = False,
    ) -> None:
        self.js = js
        self.service = service
        self.replica = replica
        self.durable = durable
        self.handle = handle
        self.retry_s = retry_s
        self.ack_wait_s = ack_wait_s
        self.stream_replicas = stream_replicas
        self.inactive_s = inactive_s
        self.shared = shared
        #: Tasks this worker reported done (for tests and status pages).
        self.done = 0

    async def run(self) -> None:
        await forever(
            self._consume,
            logger=logger,
            failed=f"forget worker {self.durable} failed; consuming again",
            retry_s=self.retry_s,
        )

    async def _consume(self) -> None:
        await ensure_forget_streams(self.js, self.stream_replicas)
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=-1,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=FORGET_TASKS_SUBJECT,
            # A pull waiting for tasks, or a task in hand, keeps the consumer; a replica that is gone
            # stops pulling, and the server removes its consumer after this long.
            inactive_threshold=self.inactive_s,
            metadata={SERVICE_METADATA: self.service}
            | ({} if self.shared else {REPLICA_METADATA: self.replica}),
        )
        with contextlib.suppress(BadRequestError):  # exists with another ack wait: keep it
            await self.js.add_consumer(FORGET_STREAM, config)
        psub = await self.js.pull_subscribe_bind(durable=self.durable, stream=FORGET_STREAM)
        try:
            while True:
                raise_if_cancelling()
                for msg in await fetch_batch(psub, 1, timeout_s=5.0):
                    await self._one(msg)
        finally:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await psub.unsubscribe()

    async def _one(self, msg: Msg) -> None:
        try:
            task = ingestion_pb2.ForgetTask.FromString(msg.data)
        except Exception:  # protobuf raises DecodeError; nothing can be done with it
            logger.error("%s: a forget task that is not a ForgetTask; dropped", self.durable)
            await msg.term()
            return
        try:
            detail = await self._handle_with_heartbeat(msg, task)
        except Exception:
            logger.exception("forget request %s: %s failed; retrying", task.request_id, self.service)
            detail = None
        if detail is None:
            await msg.nak(delay=self.retry_s)
            return
        await self.report(task.request_id, detail)
        await msg.ack()
        self.done += 1
        logger.info("forget request %s: %s done (%s)", task.request_id, self.service, detail)

    async def _handle_with_heartbeat(self, msg: Msg, task: ingestion_pb2.ForgetTask) -> str | None:
        """Runs ``handle``, telling JetStream the task is in progress while it takes long."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.ack_wait_s / 3)
                with contextlib.suppress(Exception):
                    await msg.in_progress()

        beating = asyncio.create_task(beat())
        try:
            return await self.handle(task)
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating

    async def report(self, request_id: str, detail: str) -> None:
        report = ingestion_pb2.ForgetReport(
            request_id=request_id, service=self.service, replica=self.replica, detail=detail
        )
        report.done_at.FromDatetime(datetime.now(UTC))
        await self.js.publish(
            forget_progress_subject(request_id, self.service),
            report.SerializeToString(),
            stream=FORGET_PROGRESS_STREAM,
            headers={MSG_ID_HEADER: report_id(request_id, self.service, self.replica)},
        )


async def reported(js: JetStreamContext, request_id: str, service: str) -> bool:
    """Whether some replica of ``service`` has reported its part of ``request_id`` done."""
    try:
        await js.get_msg(FORGET_PROGRESS_STREAM, subject=forget_progress_subject(request_id, service))
    except NotFoundError:
        return False
    return True


class RecentlyForgotten:
    """User ids forgotten within the last ``window_s``, in memory only (never persisted): events of
    theirs still on their way (accepted just before the tombstone) are dropped by consumers."""

    def __init__(self, window_s: float = 120.0) -> None:
        self.window_s = window_s
        self._until: dict[str, float] = {}

    def add(self, user_id: str) -> None:
        self._until[user_id] = time.monotonic() + self.window_s

    def holds(self, user_id: str) -> bool:
        """Whether ``user_id`` was forgotten within the window (cheap when nobody was)."""
        if not self._until:
            return False
        until = self._until.get(user_id)
        if until is None:
            return False
        if until < time.monotonic():
            self._until.pop(user_id, None)
            return False
        return True

    def __bool__(self) -> bool:
        return bool(self._until)
