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
from nats.aio.client import Client as NatsClient

from freshrec.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.checkpoint import restore
from services.trainer.forget import TrainerForget
from services.trainer.leadership import Lease, LostLease
from services.trainer.learner import Learner
from services.trainer.loop import TrainerLoop
from services.trainer.registry import CheckpointFile, Registry, WeightSnapshots
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings
from services.trainer.state_bucket import StateBucket
from services.trainer.text import TEXT_DIM, TextEncoder, make_text_encoder
from shared import nats as fnats
from shared.db import make_engine, make_sessionmaker, upgrade_schema
from shared.forget import ForgetWorker
from shared.grpc_server import ServiceApp, advertised_host, full_service_name
from shared.model_bucket import ModelBucket, adopt_bucket
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
        self.nc: NatsClient | None = None
        self.registry: Registry | None = None
        self.store: ModelStore | None = None
        #: With no model folder named: the model and state buckets and the leadership lease.
        self.bucket: ModelBucket | None = None
        self.state: StateBucket | None = None
        self.lease: Lease | None = None
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
        self.registry = Registry(make_sessionmaker(engine))
        self.store = ModelStore(s.model_folder())
        self.store.ensure()
        self.store.clean_temporaries()
        CheckpointFile(s.checkpoint_dir).clean_temporaries()

        nc = self.nc = await fnats.connect(s.nats, name="freshrec-trainer")
        js = nc.jetstream()
        await fnats.ensure_events_stream(js, replicas=s.nats.stream_replicas)
        if s.distributed:
            replicas = s.nats.stream_replicas
            self.bucket = await ModelBucket.open(js, replicas=replicas)
            self.state = await StateBucket.open(js, replicas=replicas)
            self.lease = await Lease.open(
                js, s.replica, advertised_host(s.grpc.host), s.lease_ttl_s, replicas
            )
            work = {"trainer-leadership": self._lead()}
        else:  # the only trainer: it leads from the start
            await self._become_leader()
            assert self.loop is not None and self.forget is not None
            work = {"trainer-loop": self.loop.run(), "trainer-forget": self.forget.run()}

        await self.serve(
            SERVICE_NAME,
            trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
            TrainerServicer(self, self.registry, s),
            tasks=work,
            cleanups=[nc.drain, partial(asyncio.to_thread, engine.dispose)],
        )
        if self.lease is not None:
            self.lease.address = f"{advertised_host(s.grpc.host)}:{self.port}"
        logger.info("trainer (%s) listening on %s:%d", s.strategy, s.grpc.host, self.port)

    async def _become_leader(self) -> None:
        """Builds the learner from the newest checkpoint (the state bucket's, when there is one) and
        the loop and forget worker around it."""
        s = self.settings
        assert self.nc is not None and self.registry is not None and self.store is not None
        js = self.nc.jetstream()
        # Each step that needs JetStream waits for it on its own (a node just lost, stream leaders
        # being elected) rather than failing the whole takeover: the lease is kept meanwhile.
        state, bucket, store = self.state, self.bucket, self.store
        if state is not None:
            await fnats.when_available(
                lambda: state.restore_into(s.checkpoint_dir), what="restoring the trainer's state"
            )
        if bucket is not None:
            live = await asyncio.to_thread(self.registry.live)
            await fnats.when_available(
                lambda: adopt_bucket(store, bucket, live.version if live else None),
                what="adopting the model bucket's versions",
            )
        learner, text = build_learner(s)
        checkpoint = CheckpointFile(s.checkpoint_dir)
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
        loop = self.loop = TrainerLoop(
            s,
            learner,
            self.store,
            self.registry,
            checkpoint,
            WeightSnapshots(s.checkpoint_dir),
            self.nc,
            js,
            text,
            self.bucket,
            self.state,
            self.lease,
        )
        self.forget = ForgetWorker(
            js,
            service="trainer",
            replica=s.consumer_name,
            durable=f"forget-{s.consumer_name}",
            handle=TrainerForget(loop),
            stream_replicas=s.nats.stream_replicas,
            inactive_s=s.nats.forget_inactive_s,
        )

    async def _lead(self) -> None:
        """Stands by until the lease is this trainer's, then learns while it holds it; after losing
        it (paused or cut off past its TTL, another trainer took over) stands by again."""
        lease = self.lease
        assert lease is not None
        while True:
            await lease.acquire()
            try:
                async with asyncio.TaskGroup() as group:
                    # Kept from the start: taking over may wait for JetStream longer than the TTL.
                    group.create_task(lease.keep(), name="trainer-lease")
                    group.create_task(self._take_over_and_learn(), name="trainer-takeover")
            except* LostLease as lost:
                logger.error(
                    "%s: standing by (the new leader resumes from the last checkpoint)", lost.exceptions[0]
                )
            except* Exception as failed:
                # Taking over needs JetStream (state, versions, the stream), which may still be
                # electing leaders after losing a node: give the lease up and try again.
                logger.error("leading failed; standing by to try again", exc_info=failed.exceptions[0])
                await asyncio.sleep(lease.ttl_s / 4)
            finally:
                self.loop = self.forget = None
                await lease.release()

    async def _take_over_and_learn(self) -> None:
        await self._become_leader()
        assert self.loop is not None and self.forget is not None
        async with asyncio.TaskGroup() as group:
            group.create_task(self.loop.run(), name="trainer-loop")
            group.create_task(self.forget.run(), name="trainer-forget")

    async def stop(self) -> None:
        await super().stop()
        self.lock.release()
