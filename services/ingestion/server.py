"""Wires the ingestion service together: SQL, NATS, the relay, the raw intake and the gRPC server."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from pathlib import Path

import grpc

from freshrec.v1 import ingestion_pb2, ingestion_pb2_grpc
from services.ingestion.ingestor import Ingestor
from services.ingestion.nats_intake import RawIntake, ensure_intake_streams
from services.ingestion.publisher import Publisher
from services.ingestion.servicer import IngestionServicer
from services.ingestion.settings import IngestionSettings
from services.ingestion.store import EventLog
from shared import nats as fnats
from shared.db import make_engine, make_sessionmaker, upgrade_schema
from shared.grpc_server import RunningServer, full_service_name, start_grpc_server
from shared.metrics import start_metrics_endpoint

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_ingestion"
SERVICE_NAME = full_service_name(ingestion_pb2.DESCRIPTOR, "IngestionService")


class IngestionApp:
    """The running ingestion service; ``start``/``stop`` for tests and ``serve_until_signal``."""

    def __init__(self, settings: IngestionSettings) -> None:
        self.settings = settings
        self.server: RunningServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None, "not started"
        return self.server.port

    async def start(self) -> None:
        s = self.settings
        engine = make_engine(s.database)
        await asyncio.to_thread(upgrade_schema, engine, MIGRATIONS, VERSION_TABLE)
        log = EventLog(make_sessionmaker(engine))

        nc = await fnats.connect(s.nats, name="freshrec-ingestion")
        js = nc.jetstream()
        await fnats.ensure_events_stream(
            js, s.duplicate_window_s, owner=True, replicas=s.nats.stream_replicas
        )
        await ensure_intake_streams(js, s.nats.stream_replicas)

        publisher = Publisher(nc, js, log, s.publish_timeout_s)
        ingestor = Ingestor(log, publisher)

        def register(server: grpc.aio.Server) -> None:
            ingestion_pb2_grpc.add_IngestionServiceServicer_to_server(
                IngestionServicer(ingestor, s.max_batch), server
            )

        self.server = await start_grpc_server(s.grpc, [SERVICE_NAME], register)
        self.server.cleanups += [nc.drain, partial(asyncio.to_thread, engine.dispose)]
        self.server.tasks += [
            asyncio.create_task(publisher.relay(s.relay_interval_s), name="outbox-relay"),
            asyncio.create_task(RawIntake(js, ingestor, s.raw_batch).run(), name="raw-intake"),
        ]
        if s.metrics.enabled:
            start_metrics_endpoint(s.metrics)
        logger.info("ingestion listening on %s:%d", s.grpc.host, self.server.port)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(self.settings.grpc.grace_s)
