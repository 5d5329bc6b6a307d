"""The model store on JetStream: versions in an Object Store bucket, the live pointer in a KV bucket.

For deployments where trainer and inference share no disk. Each service keeps a working copy of
the versions it handles in a private folder (a :class:`~shared.model_store.ModelStore`, which
verifies every file against its manifest as before); this module copies versions between that
folder and the bucket:

- the trainer writes a version to its folder, then :meth:`ModelBucket.put_version` uploads every
  file and, last, the manifest (a version is in the bucket once its manifest is), then
  :meth:`ModelBucket.set_live` puts the version's name under the KV key ``live``;
- an inference replica watches that key (:meth:`ModelBucket.watch_live`), downloads the version into
  its folder (:meth:`ModelBucket.fetch`, written under ``.tmp-*`` and renamed whole, the manifest
  byte for byte as the trainer signed it) and loads it from there.

Objects are named ``<version>/<file>``. Removing a version erases its chunks message by message
(overwritten on disk) before deleting the objects, so a withdrawn version leaves the bucket's files,
not only its listing.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from shared.model_store import MANIFEST, ArtifactError, ModelStore, StoredVersion, fsync_dir
from shared.nats import bind_key_value, bind_object_store

logger = logging.getLogger(__name__)

#: Object Store bucket of model versions (objects ``<version>/<file>``).
MODELS_BUCKET = "FRESHREC_MODELS"
#: KV bucket holding the version inference should serve, under :data:`LIVE_KEY`.
MODEL_LIVE_BUCKET = "FRESHREC_MODEL_LIVE"
#: The JetStream stream behind the Object Store bucket.
OBJECTS_STREAM = f"OBJ_{MODELS_BUCKET}"
LIVE_KEY = "live"


class ModelBucket:
    """A JetStream Object Store of model versions plus the KV pointer to the live one."""

    def __init__(self, js: JetStreamContext, objects: ObjectStore, pointer: KeyValue) -> None:
        self.js = js
        self.objects = objects
        self.pointer = pointer

    @classmethod
    async def open(cls, js: JetStreamContext, *, replicas: int = 1) -> ModelBucket:
        """Binds to both buckets, creating them (file storage, ``replicas`` copies) when missing."""
        objects = await bind_object_store(
            js,
            ObjectStoreConfig(
                bucket=MODELS_BUCKET,
                description="freshrec model versions",
                storage=StorageType.FILE,
                replicas=replicas,
            ),
        )
        pointer = await bind_key_value(
            js,
            KeyValueConfig(
                bucket=MODEL_LIVE_BUCKET,
                description="the live freshrec model version",
                history=1,
                storage=StorageType.FILE,
                replicas=replicas,
            ),
        )
        return cls(js, objects, pointer)

    # -- the trainer's side ------------------------------------------------------------------
    async def put_version(self, stored: StoredVersion) -> None:
        """Uploads a version written to a local store: its files, then its manifest."""
        for name in stored.manifest["files"]:
            await asyncio.to_thread(_check_name, name)
            with (stored.path / name).open("rb") as f:
                await self.objects.put(f"{stored.version}/{name}", f)
        manifest = await asyncio.to_thread((stored.path / MANIFEST).read_bytes)
        await self.objects.put(f"{stored.version}/{MANIFEST}", manifest)

    async def set_live(self, version: str) -> None:
        if not await self.has_version(version):
            raise ArtifactError(f"cannot make {version} live: it is not in bucket {MODELS_BUCKET}")
        await self.pointer.put(LIVE_KEY, version.encode())

    async def remove_version(self, version: str) -> None:
        """Erases every object of a version, the manifest first (so it is no longer listed)."""
        names = [n for n in await self._names() if n.startswith(f"{version}/")]
        names.sort(key=lambda n: n != f"{version}/{MANIFEST}")
        for name in names:
            try:
                await self._erase_chunks(name)
                await self.objects.delete(name)
            except NotFoundError:
                pass

    async def _erase_chunks(self, name: str) -> None:
        await erase_chunks(self.js, MODELS_BUCKET, (await self.objects.get_info(name)).nuid or "")

    # -- reading -------------------------------------------------------------------------------
    async def live_version(self) -> str | None:
        try:
            entry = await self.pointer.get(LIVE_KEY)
        except KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    async def list_versions(self) -> list[str]:
        """Complete versions (those whose manifest is in the bucket), oldest first."""
        suffix = f"/{MANIFEST}"
        return sorted(n[: -len(suffix)] for n in await self._names() if n.endswith(suffix))

    async def has_version(self, version: str) -> bool:
        try:
            info = await self.objects.get_info(f"{version}/{MANIFEST}")
        except NotFoundError:
            return False
        return not info.deleted

    async def fetch(self, version: str, store: ModelStore) -> None:
        """Makes ``version`` complete in the local ``store`` (downloading it unless it is there);
        ArtifactError when the bucket does not hold it. The caller verifies it as usual."""
        if (store.versions_dir / version / MANIFEST).is_file():
            return
        try:
            manifest_bytes = await read_object(self.objects, f"{version}/{MANIFEST}")
        except NotFoundError as exc:
            raise ArtifactError(f"version {version} is not in bucket {MODELS_BUCKET}") from exc
        manifest = store.parse_manifest(version, manifest_bytes)
        files = {}
        for name in manifest["files"]:
            _check_name(name)
            try:
                files[name] = await read_object(self.objects, f"{version}/{name}")
            except NotFoundError as exc:
                raise ArtifactError(f"version {version}: file {name} is not in the bucket") from exc
        # Writing and fsyncing megabytes would stall the event loop that serves requests.
        await asyncio.to_thread(_write_downloaded, store, version, files, manifest_bytes)
        logger.info(
            "downloaded model %s from bucket %s", version, MODELS_BUCKET, extra={"model_version": version}
        )

    async def watch_live(self) -> AsyncIterator[str]:
        """Yields the live version now (if any) and after every change of the pointer."""
        watcher = await self.pointer.watch(LIVE_KEY)
        try:
            async for entry in watcher:
                if entry is not None and entry.value:  # None: "nothing more pending" at the start
                    yield entry.value.decode()
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated

    async def _names(self) -> list[str]:
        try:
            infos = await self.objects.list(ignore_deletes=True)
        except NotFoundError:
            return []
        return [i.name for i in infos if i.name and not i.deleted]


async def erase_chunks(js: JetStreamContext, bucket: str, nuid: str) -> None:
    """Deletes an object's chunks one message at a time: JetStream's message delete overwrites the
    stored bytes, where the purge behind ``ObjectStore.delete`` (and behind a ``put`` replacing an
    object) leaves them in the stream's files; personal data must not stay readable on disk."""
    stream, subject, seq = f"OBJ_{bucket}", f"$O.{bucket}.C.{nuid}", 1
    while nuid:
        try:
            msg = await js.get_msg(stream, seq, subject=subject, next=True)
        except NotFoundError:
            return
        assert msg.seq is not None
        await js.delete_msg(stream, msg.seq)
        seq = msg.seq + 1


async def read_object(objects: ObjectStore, name: str) -> bytes:
    """An object's bytes (nats-py's ``get`` without a target concatenates chunk by chunk: quadratic)."""
    buffer = io.BytesIO()
    await objects.get(name, writeinto=buffer)
    return buffer.getvalue()


def _write_downloaded(store: ModelStore, version: str, files: dict[str, bytes], manifest: bytes) -> None:
    """Writes a downloaded version under ``.tmp-*``, fsynced, then renames it into place whole."""
    store.ensure()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=store.root))
    try:
        for name, data in files.items():
            with (tmp / name).open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        (tmp / MANIFEST).write_bytes(manifest)
        fsync_dir(tmp)
        try:
            os.rename(tmp, store.versions_dir / version)
        except OSError:
            if not (store.versions_dir / version / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another replica sharing the folder was first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_name(name: str) -> None:
    """A manifest names files inside its version, nothing else (no path tricks from the bucket)."""
    if not name or name != Path(name).name or name in (".", "..", MANIFEST):
        raise ArtifactError(f"manifest names an unsafe file {name!r}")


async def prune_local(store: ModelStore, keep: set[str]) -> list[str]:
    """Removes local copies of versions not in ``keep`` (withdrawn or retired from the bucket)."""
    removed = [v for v in store.list_versions() if v not in keep]
    for version in removed:
        await asyncio.to_thread(store.remove_version, version)
    return removed


async def adopt_bucket(store: ModelStore, bucket: ModelBucket, live: str | None) -> None:
    """A trainer taking the lead makes its folder a copy of the bucket: versions the bucket lacks are
    dropped (withdrawn or pruned by an earlier leader, or written just before a crash and never
    registered), missing ones downloaded; the bucket's live pointer then follows ``live`` (the
    registry's). An empty bucket instead receives the folder's versions (a store moving from a
    shared folder to JetStream keeps its history)."""
    there = await bucket.list_versions()
    local = await asyncio.to_thread(store.list_versions)
    if not there:
        for version in local:
            await bucket.put_version(await asyncio.to_thread(store.open_verified, version))
        if local:
            logger.info("uploaded %d model versions to the empty bucket %s", len(local), MODELS_BUCKET)
    else:
        await prune_local(store, set(there))
        for version in there:
            await bucket.fetch(version, store)
    if live and live != await bucket.live_version() and await bucket.has_version(live):
        await bucket.set_live(live)
    if live and await asyncio.to_thread(store.live_version) != live and live in store.list_versions():
        await asyncio.to_thread(store.set_live, live)
