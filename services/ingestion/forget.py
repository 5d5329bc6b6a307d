"""Forgetting a user, ingestion's side: the request (gRPC ``ForgetUser`` and NATS
``freshrec.forget.request``), the status, ingestion's own erasure and the progress record.

A request is recorded in SQL with the user's tombstone (from then on every event of theirs is
dropped), published as a ``ForgetTask`` on ``freshrec.forget.requests`` and answered with its id.
Every service carries it out with its own durable consumer (``shared/forget.py``) and reports on
``freshrec.forget.progress``; ingestion records the reports, and once every service in
``FRESHREC_FORGET__SERVICES`` has reported and so has every live replica of theirs (each feature and
inference replica has a durable consumer of its own on ``FRESHREC_FORGET``, which JetStream removes
once the replica has stopped pulling for ``FRESHREC_NATS__FORGET_INACTIVE_S``; see
``shared/forget.py``) it marks the request complete and erases the task (the only place the user
id was kept) from ``FRESHREC_FORGET``. Pending requests are checked again every
``FRESHREC_FORGET__RECHECK_S``, so a request that only waited for a replica that went away
completes once that replica's consumer is gone. One audit line per request and outcome
names the request and the user's hash, never the id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime

import grpc
from google.protobuf import json_format
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError

from freshrec.v1 import ingestion_pb2
from services.ingestion import metrics
from services.ingestion.erase import erase_user_messages
from services.ingestion.forget_store import ForgetStore, Request
from services.ingestion.settings import ForgetSettings
from services.ingestion.tombstones import Tombstones
from services.ingestion.validation import MAX_ID_CHARS
from shared.db import scrub_wal
from shared.forget import LiveReplica, ensure_forget_streams, live_replicas
from shared.nats import (
    AVAILABLE_S,
    FORGET_PROGRESS_STREAM,
    FORGET_PROGRESS_SUBJECTS,
    FORGET_REQUEST_SUBJECT,
    FORGET_STREAM,
    FORGET_TASKS_SUBJECT,
    MSG_ID_HEADER,
    fetch_batch,
)
from shared.settings import RequestLimits
from shared.supervise import forever, raise_if_cancelling
from shared.validation import RequestError, check_id

logger = logging.getLogger(__name__)
#: One line per request and outcome: request id, the user's hash, what happened. No personal data.
audit = logging.getLogger("freshrec.audit")

ID_LIMITS = RequestLimits(max_id_length=MAX_ID_CHARS)
PROGRESS_CONSUMER = "ingestion-forget-progress"
#: Headers of an error reply on freshrec.forget.request.
ERROR_HEADER = "Freshrec-Error"
ERROR_CODE_HEADER = "Freshrec-Error-Code"
JSON = "application/json"


def _ts(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, tz=UTC)


class ForgetDesk:
    """Takes forget requests and answers their status."""

    def __init__(self, store: ForgetStore, tombstones: Tombstones, settings: ForgetSettings) -> None:
        self.store = store
        self.tombstones = tombstones
        self.settings = settings
        #: Set once NATS is connected (ingestion accepts events before that, but cannot fan out).
        self.js: JetStreamContext | None = None

    async def forget(self, user_id: str) -> ingestion_pb2.ForgetUserResponse:
        check_id(user_id, "user_id", ID_LIMITS)
        if self.tombstones.key is None:
            metrics.FORGET_REQUESTS.labels("refused").inc()
            raise RequestError(
                "forgetting users needs FRESHREC_FORGET__HASH_KEY on ingestion",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        js = self.js
        if js is None:
            metrics.FORGET_REQUESTS.labels("refused").inc()
            raise RequestError(
                "NATS is unreachable, so the request cannot reach the services; retry",
                grpc.StatusCode.UNAVAILABLE,
            )
        hashed = self.tombstones.hash(user_id)
        pending = await asyncio.to_thread(self.store.open_request, hashed)
        if pending is not None:
            # A retry of a request still under way: the same request, nothing done twice.
            request = await asyncio.to_thread(self.store.get, pending)
            if request is not None and request.task_seq:
                metrics.FORGET_REQUESTS.labels("repeated").inc()
                audit.info("forget request %s for user %s: repeated", pending, hashed)
                return self._response(request.request_id, request.requested_at_us)
        request_id = uuid.uuid4().hex
        now_us = int(time.time() * 1e6)
        until_us = now_us + int(self.settings.tombstone_ttl.total_seconds() * 1e6)
        await asyncio.to_thread(self.store.add_request, request_id, hashed, now_us, until_us)
        self.tombstones.add(hashed)
        task = ingestion_pb2.ForgetTask(request_id=request_id, user_id=user_id)
        task.requested_at.FromDatetime(_ts(now_us))
        try:
            await ensure_forget_streams(js)
            ack = await js.publish(
                FORGET_TASKS_SUBJECT,
                task.SerializeToString(),
                stream=FORGET_STREAM,
                headers={MSG_ID_HEADER: request_id},
            )
        except Exception as exc:
            # The tombstone stays (it only drops the user's events); the request goes, so a retry
            # makes a new one.
            await asyncio.to_thread(self.store.drop_request, request_id)
            metrics.FORGET_REQUESTS.labels("refused").inc()
            logger.warning("publishing forget request %s failed: %s", request_id, exc)
            raise RequestError(
                "the request could not be published to NATS; retry", grpc.StatusCode.UNAVAILABLE
            ) from exc
        await asyncio.to_thread(self.store.set_task_seq, request_id, int(ack.seq))
        metrics.FORGET_REQUESTS.labels("requested").inc()
        audit.info("forget request %s for user %s: requested", request_id, hashed)
        return self._response(request_id, now_us)

    @staticmethod
    def _response(request_id: str, requested_at_us: int) -> ingestion_pb2.ForgetUserResponse:
        response = ingestion_pb2.ForgetUserResponse(request_id=request_id)
        response.requested_at.FromDatetime(_ts(requested_at_us))
        return response

    async def status(self, request_id: str) -> ingestion_pb2.GetForgetStatusResponse:
        check_id(request_id, "request_id", ID_LIMITS)
        request = await asyncio.to_thread(self.store.get, request_id)
        if request is None:
            raise RequestError(f"no forget request {request_id}", grpc.StatusCode.NOT_FOUND)
        live = await live_replicas(self.js) if self.js is not None else []
        return status_of(request, self.settings.services, live)

    # -- NATS request-reply (freshrec.forget.request) ----------------------------------------
    async def answer(self, nc: NatsClient, msg: Msg) -> None:
        """Answers one ``ForgetUserRequest`` (protobuf, or JSON with ``Content-Type:
        application/json``) with a ``ForgetUserResponse`` in the same encoding, or an empty reply
        whose headers carry the error."""
        as_json = (msg.headers or {}).get("Content-Type", "").split(";")[0].strip().lower() == JSON
        request = ingestion_pb2.ForgetUserRequest()
        try:
            try:
                if as_json:
                    json_format.Parse(msg.data, request)
                else:
                    request.ParseFromString(msg.data)
            except Exception as exc:  # DecodeError, ParseError
                raise RequestError(f"not a freshrec.v1.ForgetUserRequest: {exc}") from exc
            response = await self.forget(request.user_id)
        except RequestError as error:
            if msg.reply:
                await nc.publish(
                    msg.reply, b"", headers={ERROR_HEADER: error.reason, ERROR_CODE_HEADER: error.code.name}
                )
            return
        if msg.reply:
            data = json_format.MessageToJson(response).encode() if as_json else response.SerializeToString()
            await nc.publish(msg.reply, data, headers={"Content-Type": JSON} if as_json else None)

    async def listen(self, nc: NatsClient) -> None:
        """Serves ``freshrec.forget.request`` (replicas share the queue group ``ingestion``)."""

        async def on_request(msg: Msg) -> None:
            try:
                await self.answer(nc, msg)
            except Exception:
                logger.exception("answering a forget request over NATS failed")

        await nc.subscribe(FORGET_REQUEST_SUBJECT, queue="ingestion", cb=on_request)


def waiting_for(request: Request, services: list[str], live: list[LiveReplica]) -> list[tuple[str, str]]:
    """(service, replica) of what the request still waits for: every live replica of a service in
    ``services`` that has not reported, and a service with no report and no live replica of its own
    (replica "": one of its replicas is to report, whenever one runs)."""
    reported = {p.service for p in request.progress}
    by_replica = {(p.service, p.replica) for p in request.progress}
    waiting: list[tuple[str, str]] = []
    for service in services:
        # A shared consumer (replica None) is covered by any report of its service.
        replicas = sorted({r.replica for r in live if r.service == service and r.replica is not None})
        missing = [(service, replica) for replica in replicas if (service, replica) not in by_replica]
        if service not in reported and not missing:
            missing = [(service, "")]
        waiting += missing
    return waiting


def status_of(
    request: Request, services: list[str], live: list[LiveReplica] | None = None
) -> ingestion_pb2.GetForgetStatusResponse:
    """The request's status: a done entry per replica that reported, a pending one per service with
    no report and per live replica that has not reported (while the request is pending)."""
    response = ingestion_pb2.GetForgetStatusResponse(
        request_id=request.request_id, user_hash=request.user_hash
    )
    response.requested_at.FromDatetime(_ts(request.requested_at_us))
    pending = waiting_for(request, services, [] if request.completed_at_us else (live or []))
    for service, replica in pending:
        response.progress.add(service=service, replica=replica, state=ingestion_pb2.FORGET_STATE_PENDING)
    for p in request.progress:
        entry = response.progress.add(
            service=p.service, replica=p.replica, state=ingestion_pb2.FORGET_STATE_DONE, detail=p.detail
        )
        entry.done_at.FromDatetime(_ts(p.done_at_us))
    if request.completed_at_us:
        response.done = True
        response.completed_at.FromDatetime(_ts(request.completed_at_us))
    return response


class IngestionEraser:
    """Ingestion's share of a forget request: the event log's rows, the streams' messages."""

    def __init__(
        self, js: JetStreamContext, store: ForgetStore, tombstones: Tombstones, settings: ForgetSettings
    ) -> None:
        self.js = js
        self.store = store
        self.tombstones = tombstones
        self.settings = settings

    async def __call__(self, task: ingestion_pb2.ForgetTask) -> str | None:
        if self.tombstones.key is None:
            return None  # a replica without the key cannot hold the tombstone: another one will
        hashed = self.tombstones.hash(task.user_id)
        requested = task.requested_at.ToDatetime(tzinfo=UTC).timestamp()
        until_us = int((requested + self.settings.tombstone_ttl.total_seconds()) * 1e6)
        await asyncio.to_thread(self.store.tombstone, hashed, until_us)  # idempotent
        self.tombstones.add(hashed)
        # Events accepted just before the tombstone may still be committing or publishing.
        wait = requested + self.settings.settle_s - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        rows = await asyncio.to_thread(self.store.forget_events, task.user_id)
        metrics.FORGET_ERASED.labels("events").inc(rows)
        erased, waiting = await erase_user_messages(self.js, task.user_id)
        for attempt in range(20):
            vacuum = self.settings.vacuum and attempt == 0
            if await asyncio.to_thread(scrub_wal, self.store.engine, vacuum=vacuum):
                break
            await asyncio.sleep(0.1)
        else:
            logger.warning(
                "forget request %s: the event log's WAL could not be truncated yet", task.request_id
            )
            return None
        if waiting:
            logger.info(
                "forget request %s: %d raw messages of the user wait for the intake; trying again",
                task.request_id,
                waiting,
            )
            return None
        return f"{rows} event log rows, {erased} stream messages erased"


class ProgressRecorder:
    """Records every service's reports in SQL and completes requests once nothing live is left to
    report (one ingestion replica records each report: the replicas share the durable consumer)."""

    def __init__(self, js: JetStreamContext, store: ForgetStore, settings: ForgetSettings) -> None:
        self.js = js
        self.store = store
        self.settings = settings

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(
                forever(self._consume, logger=logger, failed="recording forget progress failed", retry_s=1.0)
            )
            group.create_task(
                forever(
                    self.recheck,
                    logger=logger,
                    failed="checking pending forget requests failed",
                    every_s=self.settings.recheck_s,
                )
            )

    async def recheck(self) -> None:
        """Completes pending requests that no live replica holds up any more (one waited for a
        replica whose consumer has since expired)."""
        for request_id in await asyncio.to_thread(self.store.pending):
            await self.complete_if_done(request_id)

    async def _consume(self) -> None:
        await ensure_forget_streams(self.js, owner=True)
        config = ConsumerConfig(
            durable_name=PROGRESS_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_deliver=-1,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=FORGET_PROGRESS_SUBJECTS,
        )
        with contextlib.suppress(BadRequestError):
            await self.js.add_consumer(FORGET_PROGRESS_STREAM, config)
        psub = await self.js.pull_subscribe_bind(durable=PROGRESS_CONSUMER, stream=FORGET_PROGRESS_STREAM)
        try:
            while True:
                raise_if_cancelling()
                # One lingering pull until a report comes, then whatever else is there at once.
                msgs = await fetch_batch(psub, 1, timeout_s=5.0)
                if msgs:
                    msgs += await fetch_batch(psub, 99, timeout_s=AVAILABLE_S)
                for msg in msgs:
                    try:
                        report = ingestion_pb2.ForgetReport.FromString(msg.data)
                    except Exception:  # DecodeError
                        await msg.term()
                        continue
                    await self.record(report)
                    await msg.ack()
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def record(self, report: ingestion_pb2.ForgetReport) -> None:
        done_us = int(report.done_at.ToDatetime(tzinfo=UTC).timestamp() * 1e6)
        known = await asyncio.to_thread(
            self.store.record, report.request_id, report.service, report.replica, done_us, report.detail
        )
        if not known:
            logger.warning("a forget report for an unknown request %s; ignored", report.request_id)
            return
        await self.complete_if_done(report.request_id, done_us)

    async def complete_if_done(self, request_id: str, done_us: int = 0) -> None:
        """Marks the request complete if every service has reported and so has every live replica."""
        request = await asyncio.to_thread(self.store.get, request_id)
        if request is None or request.completed_at_us or not request.task_seq:
            return
        if waiting_for(request, self.settings.services, []):
            return  # a service has not reported at all: no need to ask JetStream
        if waiting_for(request, self.settings.services, await live_replicas(self.js)):
            return
        completed_us = max([p.done_at_us for p in request.progress] + [done_us])
        if not await asyncio.to_thread(self.store.complete, request.request_id, completed_us):
            return
        if request.task_seq:
            with contextlib.suppress(NotFoundError):
                await self.js.delete_msg(FORGET_STREAM, request.task_seq)  # erases the user id
        seconds = max(0.0, (completed_us - request.requested_at_us) / 1e6)
        metrics.FORGET_REQUESTS.labels("completed").inc()
        metrics.FORGET_SECONDS.observe(seconds)
        audit.info(
            "forget request %s for user %s: completed in %.1fs by %s",
            request.request_id,
            request.user_hash,
            seconds,
            ", ".join(sorted(f"{p.service}/{p.replica}" for p in request.progress)),
        )
