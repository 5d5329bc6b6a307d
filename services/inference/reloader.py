"""Hot reload: learn of new versions (announcement or poll), load them off the request path, swap.

The swap is one assignment of ``holder.state``; a request reads that reference once and
finishes on the model it read, so a reload never fails or stalls a request. A version that
fails any check is rejected with a counter (by reason) and one log line; the old model keeps
serving. The last ``keep`` versions stay loaded, so a rollback swaps back instantly.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections import OrderedDict

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram

from freshrec.v1 import trainer_pb2
from services.inference.ann import AnnSettings
from services.inference.catalogue import Catalogue
from services.inference.index import ExplorationSettings, ServingState, build_state
from services.inference.model import LoadedModel, RejectedArtifact, load_model
from shared.model_bucket import ModelBucket, prune_local
from shared.model_store import ArtifactError, ModelStore
from shared.nats import MODELS_PUBLISHED_SUBJECT
from shared.supervise import forever

logger = logging.getLogger(__name__)

RELOADS = Counter("freshrec_inference_reloads_total", "Model swaps and rejections by outcome.", ["outcome"])
REJECTIONS = Counter(
    "freshrec_inference_model_rejections_total", "Model versions rejected, by failed check.", ["reason"]
)
LOAD_SECONDS = Histogram(
    "freshrec_inference_model_load_seconds",
    "Time to verify, load, smoke-test and index a model version (off the request path).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LIVE_VERSION = Gauge("freshrec_inference_model_info", "The version being served (value 1).", ["version"])
CATALOGUE_REBUILDS = Counter(
    "freshrec_inference_catalogue_rebuilds_total", "Serving states rebuilt after catalogue changes."
)


def _libc_malloc_trim() -> ctypes._NamedFuncPointer | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Hands memory freed by dropped models back to the OS (glibc keeps it in its arenas otherwise,
    and RSS would creep up with every reload)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def settle_long_lived_objects() -> None:
    """Moves what a load created (id maps, catalogue entries: tens of thousands of objects) out of
    the collector's reach. A full collection walking them stalls every request for 10-100 ms; they
    hold no reference cycles, so reference counting still frees them when the model is dropped.
    The young generations are collected first (cheap), so short-lived cyclic garbage is not frozen."""
    gc.collect(1)
    gc.freeze()


class ModelHolder:
    """The state every request reads, plus the last few versions for an instant rollback."""

    def __init__(
        self,
        store: ModelStore,
        keep: int,
        threads: int,
        catalogue: Catalogue | None = None,
        ann: AnnSettings | None = None,
        exploration: ExplorationSettings | None = None,
        public_key: Ed25519PublicKey | None = None,
        bucket: ModelBucket | None = None,
    ) -> None:
        self.store = store
        #: Where versions come from when ``store`` is only this replica's download folder.
        self.bucket = bucket
        self.public_key = public_key
        self.keep = keep
        self.threads = threads
        self.catalogue = catalogue or Catalogue()
        self.ann = ann or AnnSettings()
        self.exploration = exploration or ExplorationSettings(86_400.0, 0.1)
        self.state: ServingState | None = None
        self.loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self.failed: dict[str, str] = {}
        self.swapped = asyncio.Event()
        self._lock = asyncio.Lock()

    @property
    def current(self) -> LoadedModel | None:
        state = self.state
        return state.model if state is not None else None

    @property
    def served_version(self) -> str:
        model = self.current
        return model.version if model is not None else ""

    def _reject(self, version: str, exc: ArtifactError) -> None:
        kind = exc.kind if isinstance(exc, RejectedArtifact) else "integrity"
        RELOADS.labels("rejected").inc()
        REJECTIONS.labels(kind).inc()
        if self.failed.get(version) != str(exc):
            logger.error(
                "rejected model %s (%s), keeping %s: %s",
                version,
                kind,
                self.served_version or "none",
                exc,
                extra={"model_version": version},
            )
        self.failed[version] = str(exc)

    async def switch_to(self, version: str, expected_sha256: str | None = None) -> bool:
        """Makes ``version`` the served model; False (old model kept) if it cannot be loaded."""
        async with self._lock:
            if self.served_version == version:
                return True
            model = self.loaded.get(version)
            if model is not None and expected_sha256 and model.manifest.get("sha256") != expected_sha256:
                self._reject(
                    version,
                    RejectedArtifact(
                        "integrity", f"version {version}: loaded digest differs from the announced one"
                    ),
                )
                return False
            if model is None:
                started = time.perf_counter()
                try:
                    if self.bucket is not None:
                        await self.bucket.fetch(version, self.store)
                    model = await asyncio.to_thread(
                        load_model,
                        self.store,
                        version,
                        expected_sha256,
                        self.threads,
                        self.ann,
                        self.public_key,
                    )
                except ArtifactError as exc:
                    self._reject(version, exc)
                    return False
                LOAD_SECONDS.observe(time.perf_counter() - started)
            catalogue_version, snapshot, deleted = self.catalogue.snapshot()
            state = await asyncio.to_thread(
                build_state, model, catalogue_version, snapshot, self.state, self.exploration, deleted
            )
            self.loaded[version] = model
            self.loaded.move_to_end(version)
            while len(self.loaded) > self.keep:
                self.loaded.popitem(last=False)
            await self._drop_downloads()
            previous = self.served_version
            self.state = state
            self.failed.pop(version, None)
            RELOADS.labels("loaded").inc()
            LIVE_VERSION.clear()
            LIVE_VERSION.labels(version).set(1)
            self.swapped.set()
            settle_long_lived_objects()
            await asyncio.to_thread(release_freed_memory)
            logger.info(
                "now serving model %s (was %s): %d items (%d newer than the model)",
                version,
                previous or "none",
                state.catalogue_size,
                len(state.fresh_ids),
                extra={"model_version": version},
            )
            return True

    async def forget_user(self, user_id: str) -> bool:
        """Drops every model kept for an instant rollback whose user table names ``user_id``;
        True when the served model does not name them either. Waits for a switch in progress."""
        async with self._lock:
            served = self.served_version
            for version, model in list(self.loaded.items()):
                if version != served and user_id in model.user_rows:
                    self.loaded.pop(version, None)
            await self._drop_downloads()
            current = self.current
            return current is None or user_id not in current.user_rows

    async def _drop_downloads(self) -> None:
        """Downloaded copies are needed only while loading: keep those of the loaded versions."""
        if self.bucket is not None:
            await prune_local(self.store, set(self.loaded))

    async def live_version(self) -> str | None:
        if self.bucket is not None:
            return await self.bucket.live_version()
        return await asyncio.to_thread(self.store.live_version)

    async def refresh_catalogue(self) -> bool:
        """Rebuilds the serving state for catalogue changes; True if it rebuilt."""
        async with self._lock:
            state = self.state
            if state is None or state.catalogue_version == self.catalogue.version:
                return False
            catalogue_version, snapshot, deleted = self.catalogue.snapshot()
            self.state = await asyncio.to_thread(
                build_state, state.model, catalogue_version, snapshot, state, self.exploration, deleted
            )
            settle_long_lived_objects()
            CATALOGUE_REBUILDS.inc()
            return True

    async def follow_catalogue(self, debounce_s: float) -> None:
        """Rebuilds after catalogue changes, at most once per ``debounce_s``."""

        async def after_a_change() -> None:
            await self.catalogue.changed.wait()
            self.catalogue.changed.clear()
            await self.refresh_catalogue()

        await forever(
            after_a_change,
            logger=logger,
            failed="rebuilding the serving state after a catalogue change failed",
            every_s=debounce_s,
        )

    async def sync_with_store(self) -> None:
        """Serves whatever the store's LIVE pointer names (start-up and poll fallback)."""
        live = await self.live_version()
        if live and live != self.served_version and live not in self.failed:
            await self.switch_to(live)

    async def watch_bucket(self) -> None:
        """Serves each version the bucket's live pointer names, as it changes (other hosts' path to a
        new model; announcements and the poll still work besides it)."""
        bucket = self.bucket
        assert bucket is not None

        async def follow() -> None:
            async for live in bucket.watch_live():
                if live != self.served_version:
                    self.failed.pop(live, None)
                    await self.switch_to(live)

        await forever(follow, logger=logger, failed="watching the model bucket failed", every_s=1.0)

    async def poll(self, interval_s: float) -> None:
        await forever(
            self.sync_with_store, logger=logger, failed="polling the model store failed", every_s=interval_s
        )

    async def subscribe(self, nc: NatsClient) -> None:
        async def on_announcement(msg: Msg) -> None:
            announcement = trainer_pb2.ModelAnnouncement()
            try:
                announcement.ParseFromString(msg.data)
            except Exception:
                logger.warning("ignoring a malformed model announcement")
                return
            if announcement.version:
                logger.info(
                    "model %s announced (%s)",
                    announcement.version,
                    announcement.reason or "no reason given",
                    extra={"model_version": announcement.version},
                )
                self.failed.pop(announcement.version, None)
                await self.switch_to(announcement.version, announcement.sha256 or None)

        await nc.subscribe(MODELS_PUBLISHED_SUBJECT, cb=on_announcement)
