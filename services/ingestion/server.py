"""Wires the ingestion service together: SQL, the group committer, NATS, the relay, the raw intake
and the gRPC server.

The gRPC server starts whether or not NATS is reachable: SQL is the durable log, so events are
accepted either way. Without NATS, the named health service ``freshrec.ingestion.Publisher`` is
NOT_SERVING (the server itself stays SERVING) and a background task keeps connecting; once it
succeeds, the streams are declared, the relay drains the outbox and the raw intake starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

from nats.aio.client import Client as NatsClient

from freshrec.v1 import ingestion_pb2, ingestion_pb2_grpc
from services.ingestion import metrics
from services.ingestion.forget import ForgetDesk, IngestionEraser, ProgressRecorder
from services.ingestion.forget_store import ForgetStore
from services.ingestion.ingestor import Ingestor
from services.ingestion.nats_intake import RawIntake, ensure_intake_streams, ensure_raw_consumer
from services.ingestion.publisher import PUBLISHER_HEALTH, Publisher
from services.ingestion.reconcile import Reconciler
from services.ingestion.relay import Relay
from services.ingestion.retention import expire_events
from services.ingestion.servicer import IngestionServicer
from services.ingestion.settings import IngestionSettings
from services.ingestion.store import EventLog
from services.ingestion.tombstones import Tombstones
from services.ingestion.validation import validator_from
from services.ingestion.writer import GroupCommitter, Heartbeat
from shared import nats as fnats
from shared.db import make_engine, upgrade_schema
from shared.forget import ForgetWorker, ensure_forget_streams
from shared.grpc_server import NOT_SERVING, SERVING, ServiceApp, full_service_name
from shared.supervise import forever, retry

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_ingestion"
SERVICE_NAME = full_service_name(ingestion_pb2.DESCRIPTOR, "IngestionService")


class IngestionApp(ServiceApp):
    """The running ingestion service; ``start``/``stop`` for tests and ``serve_until_signal``."""

    def __init__(self, settings: IngestionSettings) -> None:
        super().__init__(settings)
        self.settings: IngestionSettings = settings
        self.replica_id = uuid.uuid4().hex
        self.nc: NatsClient | None = None
        self.log: EventLog | None = None
        self.publisher: Publisher | None = None
        self.relay: Relay | None = None
        self.ingestor: Ingestor | None = None
        self.forget_store: ForgetStore | None = None
        self.tombstones: Tombstones | None = None
        self.desk: ForgetDesk | None = None
        self.forget_worker: ForgetWorker | None = None

    async def start(self) -> None:
        s = self.settings
        engine = make_engine(s.database)
        await asyncio.to_thread(upgrade_schema, engine, MIGRATIONS, VERSION_TABLE)
        log = self.log = EventLog(engine)
        await asyncio.to_thread(log.prepare)
        await asyncio.to_thread(log.register_replica, self.replica_id, s.replica, int(time.time() * 1e6))

        heartbeat = Heartbeat(self.replica_id, s.replica, s.replica_lease_s / 3, s.replica_lease_s)
        committer = GroupCommitter(log, max_rows=s.commit_max_rows, heartbeat=heartbeat)
        publisher = self.publisher = Publisher(
            committer, timeout_s=s.publish_timeout_s, max_in_flight=s.max_publish_in_flight
        )
        committer.on_committed = publisher.committed
        committer.on_marked = publisher.marked
        heartbeat.on_lapse = publisher.forget_never_sent
        committer.start()
        forget_store = self.forget_store = ForgetStore(engine)
        key = s.forget.hash_key.get_secret_value().encode() if s.forget.hash_key else None
        tombstones = self.tombstones = Tombstones(forget_store, key)
        await tombstones.reload()
        publisher.forgotten = tombstones.holds  # a forgotten user's events are never published
        if key is None:
            logger.warning("FRESHREC_FORGET__HASH_KEY is unset: ForgetUser is refused")
        self.desk = ForgetDesk(forget_store, tombstones, s.forget)
        ingestor = self.ingestor = Ingestor(
            committer, publisher, validator_from(s), owner=self.replica_id, tombstones=tombstones
        )
        relay = self.relay = Relay(
            log,
            publisher,
            self.replica_id,
            s.replica,
            batch=s.relay_batch,
            interval_s=s.relay_interval_s,
            grace_s=s.relay_grace_s,
            lease_s=s.replica_lease_s,
        )
        await relay.adopt(everything=True)

        async def deregister() -> None:
            await asyncio.to_thread(log.deregister_replica, self.replica_id)

        async def dispose() -> None:
            await asyncio.to_thread(engine.dispose)

        server = await self.serve(
            SERVICE_NAME,
            ingestion_pb2_grpc.add_IngestionServiceServicer_to_server,
            IngestionServicer(ingestor, s.max_batch, self.desk),
            tasks={
                "publisher-health": self._watch_publisher(),
                "tombstones": tombstones.follow(s.forget.tombstone_refresh_s),
                "outbox-relay": relay.run(),
                **({"retention": self._expire_forever()} if s.retention.events else {}),
            },
            # Run in reverse: publisher, writer (commits the last marks), NATS, replica row, engine.
            cleanups=[dispose, deregister, self._drain_nats, committer.stop, publisher.close],
        )
        await server.health.set(PUBLISHER_HEALTH, NOT_SERVING)
        try:
            # One quick attempt: without NATS the service still accepts, so it need not wait here.
            await self._connect_nats(ingestor, attempts=1)
        except Exception as exc:
            logger.warning("NATS is unreachable (%s); accepting into the outbox and retrying", exc)
            server.tasks.append(asyncio.create_task(self._keep_connecting(ingestor), name="nats-connect"))
        logger.info(
            "ingestion replica %s (%s) listening on %s:%d",
            s.replica,
            self.replica_id,
            s.grpc.host,
            server.port,
        )

    async def _connect_nats(self, ingestor: Ingestor, attempts: int | None = None) -> None:
        s = self.settings
        assert self.server is not None and self.publisher is not None and self.relay is not None
        nats_settings = (
            s.nats if attempts is None else s.nats.model_copy(update={"connect_attempts": attempts})
        )
        nc = await fnats.connect(nats_settings, name=f"freshrec-ingestion-{s.replica}")
        try:
            js = nc.jetstream()
            await fnats.ensure_events_stream(
                js,
                s.duplicate_window_s,
                owner=True,
                replicas=s.nats.stream_replicas,
                max_age_s=s.retention.max_age_s(),
            )
            await ensure_intake_streams(js, s.dlq_duplicate_window_s, s.nats.stream_replicas, s.retention)
            await ensure_raw_consumer(js, s.raw_ack_wait_s)
            await ensure_forget_streams(js, s.nats.stream_replicas, owner=True)
        except BaseException:
            await nc.close()
            raise
        self.nc = nc
        log = self.log
        assert log is not None

        async def mark_found(ids: list[str]) -> int:
            return await asyncio.to_thread(log.mark_published_ids, ids)

        self.relay.reconciler = Reconciler(
            js,
            fnats.EVENTS_STREAM,
            fnats.ACCEPTED_SUBJECTS,
            mark_found,
            window_s=s.duplicate_window_s,
            margin_s=s.reconcile_margin_s,
            clock_skew_s=s.reconcile_clock_skew_s,
            never_sent=self.publisher.never_sent,
        )
        await self.publisher.attach(nc)
        intake = RawIntake(
            js,
            ingestor,
            max_batch=s.max_batch,
            fetch_messages=s.raw_batch,
            fetch_events=s.raw_fetch_events,
            workers=s.raw_workers,
            dlq_window_s=s.dlq_duplicate_window_s,
            clock_skew_s=s.reconcile_clock_skew_s,
        )
        self.server.tasks.append(asyncio.create_task(intake.run(), name="raw-intake"))
        assert self.desk is not None and self.forget_store is not None and self.tombstones is not None
        self.desk.js = js
        await self.desk.listen(nc)
        worker = self.forget_worker = ForgetWorker(
            js,
            service="ingestion",
            replica=s.replica,
            durable="forget-ingestion",
            handle=IngestionEraser(js, self.forget_store, self.tombstones, s.forget),
            stream_replicas=s.nats.stream_replicas,
            inactive_s=s.nats.forget_inactive_s,
            shared=True,  # the replicas share one consumer: any one erases
        )
        recorder = ProgressRecorder(js, self.forget_store, s.forget)
        self.server.tasks.append(asyncio.create_task(worker.run(), name="forget-worker"))
        self.server.tasks.append(asyncio.create_task(recorder.run(), name="forget-progress"))

    async def _expire_forever(self) -> None:
        log = self.log
        assert log is not None
        await forever(
            lambda: expire_events(log, self.settings.retention),
            logger=logger,
            failed="retention sweep of the event log failed; retrying",
            every_s=self.settings.retention.sweep_interval_s,
        )

    async def _keep_connecting(self, ingestor: Ingestor) -> None:
        wait_s = self.settings.nats.reconnect_wait_s
        await asyncio.sleep(wait_s)
        await retry(
            lambda: self._connect_nats(ingestor),
            logger=logger,
            failed="NATS still unreachable",
            retry_s=wait_s,
            level=logging.DEBUG,
        )
        logger.info("connected to NATS; publishing the outbox")

    async def _watch_publisher(self) -> None:
        """Keeps the publisher's health service and gauges in step with the publish path."""
        assert self.server is not None and self.publisher is not None
        serving: bool | None = None
        while True:
            connected = self.publisher.connected
            now_serving = self.publisher.serving
            metrics.NATS_CONNECTED.set(1 if connected else 0)
            metrics.PUBLISHER_SERVING.set(1 if now_serving else 0)
            if now_serving != serving:
                await self.server.health.set(PUBLISHER_HEALTH, SERVING if now_serving else NOT_SERVING)
                if serving is not None:
                    logger.warning(
                        "publisher %s",
                        "publishing again" if now_serving else "not publishing; events wait in the outbox",
                    )
                serving = now_serving
            await asyncio.sleep(0.2)

    async def _drain_nats(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout=5)
            except Exception:
                await self.nc.close()
