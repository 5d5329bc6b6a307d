"""Wires the trainer together: registry, checkpoint, learner, model store, NATS and gRPC."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from pathlib import Path

import grpc
import torch

from freshrec.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.learner import OnlineLearner
from services.trainer.loop import TrainerLoop
from services.trainer.registry import CheckpointFile, Registry
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings
from shared import nats as fnats
from shared.db import make_engine, make_sessionmaker, upgrade_schema
from shared.grpc_server import RunningServer, full_service_name, start_grpc_server
from shared.metrics import start_metrics_endpoint
from shared.model_store import ModelStore

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_trainer"
SERVICE_NAME = full_service_name(trainer_pb2.DESCRIPTOR, "TrainerService")


class TrainerApp:
    """The running trainer service."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.server: RunningServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None, "not started"
        return self.server.port

    async def start(self) -> None:
        s = self.settings
        torch.set_num_threads(s.torch_threads)
        engine = make_engine(s.database)
        await asyncio.to_thread(upgrade_schema, engine, MIGRATIONS, VERSION_TABLE)
        registry = Registry(make_sessionmaker(engine))
        store = ModelStore(s.model_store)
        store.ensure()
        store.clean_temporaries()

        learner = OnlineLearner(s.dim, s.max_history, s.learning_rate, s.seed)
        checkpoint = CheckpointFile(s.checkpoint_dir)
        saved = await asyncio.to_thread(checkpoint.load)
        if saved is not None:
            await asyncio.to_thread(learner.restore, saved)
            logger.info(
                "resumed from checkpoint: %d events learned, stream position %d",
                learner.state.events_learned,
                learner.state.stream_sequence,
            )

        nc = await fnats.connect(s.nats, name="freshrec-trainer")
        js = nc.jetstream()
        await fnats.ensure_events_stream(js, replicas=s.nats.stream_replicas)
        loop = TrainerLoop(s, learner, store, registry, checkpoint, nc, js)

        def register(server: grpc.aio.Server) -> None:
            trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
                TrainerServicer(loop, learner, registry, s.strategy), server
            )

        self.server = await start_grpc_server(s.grpc, [SERVICE_NAME], register)
        self.server.cleanups += [nc.drain, partial(asyncio.to_thread, engine.dispose)]
        self.server.tasks.append(asyncio.create_task(loop.run(), name="trainer-loop"))
        if s.metrics.enabled:
            start_metrics_endpoint(s.metrics)
        logger.info("trainer listening on %s:%d", s.grpc.host, self.server.port)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(self.settings.grpc.grace_s)
