"""Wires the trainer together: registry, checkpoint, learner, model store, NATS and gRPC."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from functools import partial
from pathlib import Path
from typing import IO

import torch

from freshrec.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.checkpoint import restore
from services.trainer.forget import TrainerForget
from services.trainer.learner import Learner
from services.trainer.loop import TrainerLoop
from services.trainer.registry import CheckpointFile, Registry, WeightSnapshots
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings
from services.trainer.text import TEXT_DIM, TextEncoder, make_text_encoder
from shared import nats as fnats
from shared.db import make_engine, make_sessionmaker, upgrade_schema
from shared.forget import ForgetWorker
from shared.grpc_server import ServiceApp, full_service_name
from shared.model_bucket import ModelBucket, upload_missing
from shared.model_store import ModelStore

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_trainer"
SERVICE_NAME = full_service_name(trainer_pb2.DESCRIPTOR, "TrainerService")


class CheckpointLock:
    """An exclusive lock on the checkpoint folder: one trainer (or one pretrain) at a time."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".lock"
        self.file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RuntimeError(
                f"another trainer holds {self.path} (a running service or pretrain); stop it first"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def build_learner(settings: TrainerSettings) -> tuple[Learner, TextEncoder | None]:
    """A fresh learner shaped by the settings (the text extra decides the text input)."""
    text = make_text_encoder(settings.text_features, settings.torch_threads)
    return Learner(settings.learner_config(TEXT_DIM if text is not None else 0)), text


class TrainerApp(ServiceApp):
    """The running trainer service."""

    def __init__(self, settings: TrainerSettings) -> None:
        super().__init__(settings)
        self.settings: TrainerSettings = settings
        self.loop: TrainerLoop | None = None
        self.forget: ForgetWorker | None = None
        self.lock = CheckpointLock(settings.checkpoint_dir)

    async def start(self) -> None:
        s = self.settings
        torch.set_num_threads(s.torch_threads)
        self.lock.acquire()
        try:
            await self._start()
        except BaseException:
            self.lock.release()
            raise

    async def _start(self) -> None:
        s = self.settings
        engine = make_engine(s.database)
        await asyncio.to_thread(upgrade_schema, engine, MIGRATIONS, VERSION_TABLE)
        registry = Registry(make_sessionmaker(engine))
        store = ModelStore(s.model_folder())
        store.ensure()
        store.clean_temporaries()

        learner, text = build_learner(s)
        checkpoint = CheckpointFile(s.checkpoint_dir)
        checkpoint.clean_temporaries()
        saved = await asyncio.to_thread(checkpoint.load)
        if saved is not None:
            await asyncio.to_thread(restore, learner, saved)
            logger.info(
                "resumed from checkpoint: %d events learned, stream position %d",
                learner.position.events_learned,
                learner.position.stream_sequence,
            )
        if learner.config.model.text_dim and text is None:
            logger.warning(
                "the checkpoint uses text features but the `text` extra is missing: new items get none"
            )

        nc = await fnats.connect(s.nats, name="freshrec-trainer")
        js = nc.jetstream()
        await fnats.ensure_events_stream(js, replicas=s.nats.stream_replicas)
        bucket = None
        if s.model_store is None:
            bucket = await ModelBucket.open(js, replicas=s.nats.stream_replicas)
            await upload_missing(store, bucket)
        loop = self.loop = TrainerLoop(
            s, learner, store, registry, checkpoint, WeightSnapshots(s.checkpoint_dir), nc, js, text, bucket
        )
        forget = self.forget = ForgetWorker(
            js,
            service="trainer",
            replica=s.consumer_name,
            durable=f"forget-{s.consumer_name}",
            handle=TrainerForget(loop),
            stream_replicas=s.nats.stream_replicas,
        )

        await self.serve(
            SERVICE_NAME,
            trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
            TrainerServicer(loop, registry, s),
            tasks={"trainer-loop": loop.run(), "trainer-forget": forget.run()},
            cleanups=[nc.drain, partial(asyncio.to_thread, engine.dispose)],
        )
        logger.info("trainer (%s) listening on %s:%d", s.strategy, s.grpc.host, self.port)

    async def stop(self) -> None:
        await super().stop()
        self.lock.release()
