"""The trainer's state on JetStream, for a standby on another host to take over from.

Bucket ``FRESHREC_TRAINER_STATE`` (Object Store) holds what ``<checkpoint dir>`` holds locally:
the checkpoint (``checkpoint/<generation>``: each save is a new object, the previous one erased only
once the new one is complete, so a crash mid-upload leaves the older checkpoint whole) and the
weights of exported versions (``versions/<version>.pt``). The leader mirrors its folder after every
checkpoint, before it acknowledges events or publishes the version the checkpoint covers; a new
leader copies the bucket into its folder before it restores the learner.

Replaced and removed objects have their chunks erased message by message (see
:func:`shared.model_bucket.erase_chunks`), so a forgotten user's state leaves the stream's files.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from services.trainer.registry import CheckpointFile
from shared.model_bucket import erase_chunks, read_object
from shared.nats import bind_object_store

logger = logging.getLogger(__name__)

STATE_BUCKET = "FRESHREC_TRAINER_STATE"
CHECKPOINTS = "checkpoint/"
WEIGHTS = "versions/"


class StateBucket:
    def __init__(self, js: JetStreamContext, objects: ObjectStore) -> None:
        self.js = js
        self.objects = objects

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int = 1) -> StateBucket:
        config = ObjectStoreConfig(
            bucket=STATE_BUCKET,
            description="the freshrec trainer's checkpoint and version weights",
            storage=StorageType.FILE,
            replicas=replicas,
        )
        return cls(js, await bind_object_store(js, config))

    async def _names(self) -> dict[str, str]:
        """Object name → nuid of every object present."""
        try:
            infos = await self.objects.list(ignore_deletes=True)
        except NotFoundError:
            return {}
        return {i.name: i.nuid or "" for i in infos if i.name and not i.deleted}

    async def _remove(self, name: str, nuid: str) -> None:
        await erase_chunks(self.js, STATE_BUCKET, nuid)
        try:
            await self.objects.delete(name)
        except NotFoundError:
            pass

    # -- the leader ----------------------------------------------------------------------------
    async def mirror(self, folder: Path) -> None:
        """Makes the bucket hold what ``folder`` holds: the checkpoint as a new generation, weights the
        bucket lacks uploaded, weights no longer in the folder erased."""
        present = await self._names()
        checkpoint = CheckpointFile(folder).path
        if checkpoint.is_file():
            older = {n: u for n, u in present.items() if n.startswith(CHECKPOINTS)}
            generation = 1 + max((int(n[len(CHECKPOINTS) :]) for n in older), default=0)
            data = await asyncio.to_thread(checkpoint.read_bytes)
            await self.objects.put(f"{CHECKPOINTS}{generation:012d}", data)
            for name, nuid in older.items():
                await self._remove(name, nuid)
        local = {p.name: p for p in (folder / "versions").glob("v*.pt")}
        for name, path in local.items():
            if WEIGHTS + name not in present:
                await self.objects.put(WEIGHTS + name, await asyncio.to_thread(path.read_bytes))
        for name, nuid in present.items():
            if name.startswith(WEIGHTS) and name[len(WEIGHTS) :] not in local:
                await self._remove(name, nuid)

    # -- a trainer taking over -----------------------------------------------------------------
    async def restore_into(self, folder: Path) -> bool:
        """Replaces the folder's checkpoint and weights with the bucket's; False if the bucket holds
        no checkpoint (the folder is left as it is: a first leader, or state from before failover)."""
        present = await self._names()
        checkpoints = sorted(n for n in present if n.startswith(CHECKPOINTS))
        if not checkpoints:
            return False
        file = CheckpointFile(folder)
        await asyncio.to_thread(file.save, await read_object(self.objects, checkpoints[-1]))
        weights = CheckpointFile(folder / "versions")
        wanted = {n[len(WEIGHTS) :] for n in present if n.startswith(WEIGHTS)}
        for name in wanted:
            await asyncio.to_thread(weights.save_as, name, await read_object(self.objects, WEIGHTS + name))
        for path in (folder / "versions").glob("v*.pt"):
            if path.name not in wanted:
                path.unlink()
        logger.info(
            "restored checkpoint %s and %d version weights from bucket %s",
            checkpoints[-1].removeprefix(CHECKPOINTS),
            len(wanted),
            STATE_BUCKET,
        )
        return True
