"""Hot reload: learn of new versions (announcement or poll), load them off the request path, swap.

The swap is one assignment of ``holder.current``; a request reads that reference once and
finishes on the model it read, so a reload never fails or stalls a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from freshrec.v1 import trainer_pb2
from services.inference.model import LoadedModel, load_model
from shared.model_store import ArtifactError, ModelStore
from shared.nats import MODELS_PUBLISHED_SUBJECT

logger = logging.getLogger(__name__)

RELOADS = Counter("freshrec_inference_reloads_total", "Model loads by outcome.", ["outcome"])
LIVE_VERSION = Gauge("freshrec_inference_model_info", "The version being served (value 1).", ["version"])


class ModelHolder:
    """The reference every request reads, plus the last few versions for an instant rollback."""

    def __init__(
        self, store: ModelStore, keep: int, threads: int, public_key: Ed25519PublicKey | None = None
    ) -> None:
        self.store = store
        self.public_key = public_key
        self.keep = keep
        self.threads = threads
        self.current: LoadedModel | None = None
        self.loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self.failed: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def switch_to(self, version: str, expected_sha256: str | None = None) -> bool:
        """Makes ``version`` the served model; False (old model kept) if it cannot be loaded."""
        async with self._lock:
            if self.current is not None and self.current.version == version:
                return True
            model = self.loaded.get(version)
            if model is None:
                try:
                    model = await asyncio.to_thread(
                        load_model, self.store, version, expected_sha256, self.threads, self.public_key
                    )
                except ArtifactError as exc:
                    RELOADS.labels("rejected").inc()
                    if self.failed.get(version) != str(exc):
                        logger.error("rejected model %s, keeping %s: %s", version, self.served_version, exc)
                    self.failed[version] = str(exc)
                    return False
                self.loaded[version] = model
                while len(self.loaded) > self.keep:
                    self.loaded.popitem(last=False)
            else:
                self.loaded.move_to_end(version)
            previous = self.served_version
            self.current = model
            self.failed.pop(version, None)
            RELOADS.labels("loaded").inc()
            LIVE_VERSION.clear()
            LIVE_VERSION.labels(version).set(1)
            logger.info("now serving model %s (was %s)", version, previous or "none")
            return True

    @property
    def served_version(self) -> str:
        return self.current.version if self.current else ""

    async def sync_with_store(self) -> None:
        """Serves whatever the store's LIVE pointer names (start-up and poll fallback)."""
        live = await asyncio.to_thread(self.store.live_version)
        if live and live != self.served_version and live not in self.failed:
            await self.switch_to(live)

    async def poll(self, interval_s: float) -> None:
        while True:
            try:
                await self.sync_with_store()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("polling the model store failed")
            await asyncio.sleep(interval_s)

    async def subscribe(self, nc: NatsClient) -> None:
        async def on_announcement(msg: Msg) -> None:
            announcement = trainer_pb2.ModelAnnouncement()
            try:
                announcement.ParseFromString(msg.data)
            except Exception:
                logger.warning("ignoring a malformed model announcement")
                return
            if announcement.version:
                self.failed.pop(announcement.version, None)
                await self.switch_to(announcement.version, announcement.sha256 or None)

        await nc.subscribe(MODELS_PUBLISHED_SUBJECT, cb=on_announcement)
