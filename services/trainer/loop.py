"""The trainer's main loop: consume, learn, export, checkpoint, publish, ack.

Order of effects for one export (each step survives a crash of the next):
1. the version is written to the model store (atomically: it appears complete or not at all);
2. the checkpoint (weights, optimizer, id maps, stream position) is replaced atomically;
3. the registry records the version live, ``LIVE`` points at it, the announcement goes out;
4. JetStream gets one ack covering every event the checkpoint holds.
Events after the checkpoint are redelivered after a crash and learned once (the learner skips
stream sequences it already holds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from freshrec.v1 import event_pb2, trainer_pb2
from services.trainer.export import export_learner
from services.trainer.learner import OnlineLearner
from services.trainer.registry import LIVE, CheckpointFile, ModelRow, NewVersion, Registry, next_version
from services.trainer.settings import TrainerSettings
from shared.model_store import ModelStore
from shared.nats import MODELS_PUBLISHED_SUBJECT, StreamReader
from shared.signing import load_private_key
from shared.watermark import watermark_proto

logger = logging.getLogger(__name__)


@dataclass
class ExportRequest:
    done: asyncio.Future[ModelRow | None]


class TrainerLoop:
    def __init__(
        self,
        settings: TrainerSettings,
        learner: OnlineLearner,
        store: ModelStore,
        registry: Registry,
        checkpoint: CheckpointFile,
        nc: NatsClient,
        js: JetStreamContext,
    ) -> None:
        self.settings = settings
        self.learner = learner
        self.store = store
        self.registry = registry
        self.checkpoint = checkpoint
        self.nc = nc
        self.js = js
        self.requests: asyncio.Queue[ExportRequest] = asyncio.Queue()
        self.live_lock = asyncio.Lock()
        self.last_export_at: float = 0.0
        self.last_export_seconds: float = 0.0
        self.signing_key = load_private_key(settings.signing_key_file) if settings.signing_key_file else None

    async def run(self) -> None:
        s = self.settings
        reader = StreamReader(self.js, s.consumer_name, ack_wait_s=max(60.0, 3 * s.export_interval_s))
        # Seated at the position the checkpoint holds: events after it are learned exactly once.
        await reader.seat(self.learner.state.stream_sequence)
        try:
            await self._consume(reader)
        finally:
            await reader.close()

    async def _consume(self, reader: StreamReader) -> None:
        s = self.settings
        unacked: Msg | None = None
        since_export = 0
        last_export = time.monotonic()
        reseat = False
        while True:
            try:
                if reseat:
                    await reader.seat(self.learner.state.stream_sequence)
                    reseat = False
                msgs = await reader.fetch(s.micro_batch, timeout_s=s.micro_batch_wait_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                # NATS trouble: the learner's memory is consistent, so go on from its position.
                logger.exception("fetching events failed; re-seating after the learner's position")
                await asyncio.sleep(1.0)
                reseat = True
                continue
            if msgs:
                batch = []
                for msg in msgs:
                    event = event_pb2.Event()
                    event.ParseFromString(msg.data)
                    batch.append((msg.metadata.sequence.stream, event))
                since_export += await asyncio.to_thread(self.learner.learn, batch)
                unacked = msgs[-1]
            request = None if self.requests.empty() else self.requests.get_nowait()
            due = since_export > 0 and (
                time.monotonic() - last_export >= s.export_interval_s or since_export >= s.export_every_events
            )
            if not (due or request):
                continue
            try:
                row = await self.export_and_publish()
            except Exception as exc:
                logger.exception("export failed; will retry at the next interval")
                if request:
                    request.done.set_exception(exc)
                last_export = time.monotonic()
                continue
            since_export = 0
            last_export = time.monotonic()
            if unacked is not None:
                await unacked.ack()
                unacked = None
            if request:
                request.done.set_result(row)

    async def request_export(self) -> ModelRow | None:
        """Asks the loop for an export now and waits for it (TriggerTraining)."""
        request = ExportRequest(asyncio.get_running_loop().create_future())
        await self.requests.put(request)
        return await request.done

    async def export_and_publish(self) -> ModelRow:
        live = await asyncio.to_thread(self.registry.live)
        parent = live.version if live else None
        exported = await asyncio.to_thread(export_learner, self.learner, parent)
        known = [*await asyncio.to_thread(self.registry.versions), *self.store.list_versions()]
        version = next_version(known)
        stored = await asyncio.to_thread(
            self.store.write_version, version, exported.files, exported.manifest, self.signing_key
        )
        await asyncio.to_thread(self.checkpoint.save, self.learner.checkpoint_bytes())
        trained = exported.manifest["trained_through"]
        new = NewVersion(
            version=version,
            parent_version=parent or "",
            sha256=stored.manifest["sha256"],
            metrics=exported.manifest["metrics"],
            trained_through_sequence=trained["stream_sequence"],
            trained_through_time=trained["event_time"],
        )
        async with self.live_lock:
            row = await asyncio.to_thread(self.registry.add, new, LIVE)
            await asyncio.to_thread(self.store.set_live, version)
            await self.announce(row, "published")
        self.last_export_at = time.time()
        self.last_export_seconds = exported.seconds
        logger.info(
            "published model %s (%d events learned, export %.2fs)",
            version,
            self.learner.state.events_learned,
            exported.seconds,
            extra={"model_version": version},
        )
        return row

    async def make_live(self, version: str, reason: str) -> tuple[ModelRow, str]:
        """Promotion and rollback: verify the artifact, move the registry and LIVE, announce."""
        async with self.live_lock:
            await asyncio.to_thread(self.store.open_verified, version)
            row, previous = await asyncio.to_thread(self.registry.make_live, version)
            await asyncio.to_thread(self.store.set_live, version)
            await self.announce(row, reason)
            return row, previous

    async def announce(self, row: ModelRow, reason: str) -> None:
        announcement = trainer_pb2.ModelAnnouncement(
            version=row.version,
            sha256=row.sha256,
            reason=reason,
            trained_through=watermark_proto(row.trained_through_sequence, row.trained_through_time),
        )
        try:
            # No flush(timeout) here: in nats-py a flush that times out leaves a cancelled PONG
            # future behind, and the late PONG then breaks the client's read loop (seen with the
            # server frozen). The publish is buffered and sent on reconnection; the store poll
            # covers an announcement that never arrives.
            await self.nc.publish(MODELS_PUBLISHED_SUBJECT, announcement.SerializeToString())
        except Exception as exc:
            # Inference also polls the store's LIVE pointer, so a lost announcement only delays.
            logger.warning("announcing %s failed: %s", row.version, exc)
