"""The JetStream model store on a real nats-server: versions go up file by file and come down
byte for byte (signature intact), the live pointer is watched, removal erases, and nothing the
bucket names can be written outside a version's folder."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.model_bucket import MODELS_BUCKET, ModelBucket, adopt_bucket, prune_local
from shared.model_store import ArtifactError, ModelStore
from tests.conftest import eventually


def write(
    store: ModelStore,
    version: str,
    key: Ed25519PrivateKey | None = None,
    users: tuple[str, ...] = ("u1", "u2"),
) -> dict[str, bytes]:
    # Larger than one object chunk (128 KiB), so chunking and reassembly are exercised.
    files = {"item_embeddings.npy": os.urandom(300_000), "user_ids.json": json.dumps(["", *users]).encode()}
    store.write_version(version, files, {"format": "test", "parent_version": ""}, key)
    return files


async def test_a_version_comes_down_byte_for_byte_and_verifies(nats_client: Any, tmp_path: Path) -> None:
    bucket = await ModelBucket.open(nats_client.jetstream())
    trainer, replica = ModelStore(tmp_path / "trainer"), ModelStore(tmp_path / "replica")
    key = Ed25519PrivateKey.generate()
    files = write(trainer, "v000001", key)
    assert await bucket.live_version() is None and await bucket.list_versions() == []

    await bucket.put_version(trainer.open_verified("v000001"))
    await bucket.set_live("v000001")
    assert await bucket.list_versions() == ["v000001"] and await bucket.live_version() == "v000001"

    await bucket.fetch("v000001", replica)
    stored = replica.open_verified("v000001", public_key=key.public_key())
    assert {name: (stored.path / name).read_bytes() for name in files} == files
    assert (stored.path / "manifest.json").read_bytes() == (
        trainer.versions_dir / "v000001/manifest.json"
    ).read_bytes()
    assert not list(replica.root.glob(".tmp-*"))
    # Binding again (another service, a restart) finds the same buckets.
    again = await ModelBucket.open(nats_client.jetstream())
    assert await again.live_version() == "v000001"


async def test_what_the_bucket_lacks_is_refused(nats_client: Any, tmp_path: Path) -> None:
    bucket = await ModelBucket.open(nats_client.jetstream())
    with pytest.raises(ArtifactError, match="not in bucket"):
        await bucket.set_live("v000007")
    with pytest.raises(ArtifactError, match="not in bucket"):
        await bucket.fetch("v000007", ModelStore(tmp_path / "replica"))
    assert await bucket.live_version() is None


async def test_removing_a_version_erases_its_chunks(
    nats_client: Any, nats_server: Any, tmp_path: Path
) -> None:
    js = nats_client.jetstream()
    bucket = await ModelBucket.open(js)
    trainer = ModelStore(tmp_path / "trainer")
    write(trainer, "v000001", users=("withdrawn-user-4711",))
    write(trainer, "v000002")
    for version in ("v000001", "v000002"):
        await bucket.put_version(trainer.open_verified(version))
    before = (await js.stream_info(f"OBJ_{MODELS_BUCKET}")).state.bytes

    await bucket.remove_version("v000001")
    assert await bucket.list_versions() == ["v000002"] and not await bucket.has_version("v000001")
    after = (await js.stream_info(f"OBJ_{MODELS_BUCKET}")).state.bytes
    assert before - after > 300_000  # the chunks are purged, not only unlisted
    with pytest.raises(ArtifactError):
        await bucket.fetch("v000001", ModelStore(tmp_path / "replica"))
    # Erased, not only purged: no file of the JetStream store holds the version's user table.
    await nats_client.flush()
    held = [
        p for p in (tmp_path / "nats").rglob("*") if p.is_file() and b"withdrawn-user-4711" in p.read_bytes()
    ]
    assert held == []


async def test_the_live_pointer_is_watched(nats_client: Any, tmp_path: Path) -> None:
    bucket = await ModelBucket.open(nats_client.jetstream())
    trainer = ModelStore(tmp_path / "trainer")
    for version in ("v000001", "v000002"):
        write(trainer, version)
        await bucket.put_version(trainer.open_verified(version))
    await bucket.set_live("v000001")
    seen: list[str] = []

    async def watch() -> None:
        async for version in bucket.watch_live():
            seen.append(version)

    task = asyncio.create_task(watch())
    try:
        await eventually(lambda: _true(seen == ["v000001"]), what="the current live version")
        await bucket.set_live("v000002")
        await bucket.set_live("v000001")
        await eventually(lambda: _true(seen == ["v000001", "v000002", "v000001"]), what="both changes")
    finally:
        task.cancel()


async def test_a_manifest_cannot_name_files_outside_its_version(nats_client: Any, tmp_path: Path) -> None:
    bucket = await ModelBucket.open(nats_client.jetstream())
    manifest = {"version": "v000003", "files": {"../../escaped": {"sha256": "0" * 64, "bytes": 1}}}
    await bucket.objects.put("v000003/../../escaped", b"x")
    await bucket.objects.put("v000003/manifest.json", json.dumps(manifest).encode())
    replica = ModelStore(tmp_path / "replica" / "models")
    with pytest.raises(ArtifactError, match="unsafe file"):
        await bucket.fetch("v000003", replica)
    assert not (tmp_path / "replica" / "escaped").exists() and not (tmp_path / "escaped").exists()
    assert replica.list_versions() == [] and not list(replica.root.glob(".tmp-*"))


async def test_a_trainer_taking_the_lead_copies_the_bucket_and_drops_what_it_lacks(
    nats_client: Any, tmp_path: Path
) -> None:
    bucket = await ModelBucket.open(nats_client.jetstream())
    first = ModelStore(tmp_path / "first-leader")
    write(first, "v000001")
    write(first, "v000002")
    # The bucket is empty: the folder's history goes up (a store moving off a shared folder).
    await adopt_bucket(first, bucket, "v000002")
    assert await bucket.list_versions() == ["v000001", "v000002"] and await bucket.live_version() == "v000002"

    # A standby with a stale copy (v000001 was withdrawn since, v000009 never registered).
    await bucket.remove_version("v000001")
    standby = ModelStore(tmp_path / "standby")
    write(standby, "v000001", users=("withdrawn-user",))
    write(standby, "v000009")
    await adopt_bucket(standby, bucket, "v000002")
    assert standby.list_versions() == ["v000002"] and standby.live_version() == "v000002"
    assert await bucket.list_versions() == ["v000002"]  # nothing withdrawn came back


async def test_replicas_keep_only_what_they_use(nats_client: Any, tmp_path: Path) -> None:
    bucket = await ModelBucket.open(nats_client.jetstream())
    trainer = ModelStore(tmp_path / "trainer")
    for version in ("v000001", "v000002"):
        write(trainer, version)
        await bucket.put_version(trainer.open_verified(version))
    replica = ModelStore(tmp_path / "replica")
    for version in ("v000001", "v000002"):
        await bucket.fetch(version, replica)
    assert await prune_local(replica, {"v000002"}) == ["v000001"]
    assert replica.list_versions() == ["v000002"]


async def _true(value: bool) -> bool:
    return value
