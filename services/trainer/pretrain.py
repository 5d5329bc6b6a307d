"""``python -m services.trainer pretrain``: learn from history before learning online.

The history is the event stream FRESHREC_EVENTS replayed from its start (the SQL ``events``
table belongs to ingestion and is never read here) or a MovieLens-style ratings file; the
catalogue (FRESHREC_CATALOG, or a ``u.item`` / ``movies.csv`` file) gives content features.
The result is the checkpoint the service then fine-tunes online (histories, id maps, replay
buffer and stream position included) and, unless ``--publish false``, the new live version.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import torch

from freshrec.v1 import event_pb2, item_pb2
from services.trainer import datasets
from services.trainer.checkpoint import to_bytes
from services.trainer.export import export_learner
from services.trainer.learner import Learner
from services.trainer.loop import read_event_log
from services.trainer.registry import (
    LIVE,
    CheckpointFile,
    NewVersion,
    Registry,
    WeightSnapshots,
    next_version,
)
from services.trainer.server import MIGRATIONS, VERSION_TABLE, CheckpointLock, build_learner
from services.trainer.settings import PretrainCommand, TrainerSettings
from services.trainer.text import TextEncoder
from services.trainer.versions import snapshot
from shared import nats as fnats
from shared.db import make_engine, make_sessionmaker, upgrade_schema
from shared.model_bucket import ModelBucket
from shared.model_store import ModelStore
from shared.signing import load_private_key

logger = logging.getLogger(__name__)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _read_stream(
    settings: TrainerSettings,
) -> tuple[list[tuple[int, event_pb2.Event]], list[tuple[int, item_pb2.Item]], Any]:
    nc = await fnats.connect(settings.nats, name="freshrec-trainer-pretrain")
    js = nc.jetstream()
    await fnats.ensure_events_stream(js)
    say("reading the event stream FRESHREC_EVENTS from its start ...")
    events = await read_event_log(js, 0)
    items: list[tuple[int, item_pb2.Item]] = []
    try:
        info = await js.stream_info(fnats.CATALOGUE_STREAM)
        last = int(info.state.last_seq)
        if last:
            sub = await js.pull_subscribe(
                fnats.CATALOGUE_ACCEPTED_SUBJECT, durable=None, stream=fnats.CATALOGUE_STREAM
            )
            while True:
                msgs = await fnats.fetch_batch(sub, 1000, timeout_s=5.0)
                for m in msgs:
                    items.append((m.metadata.sequence.stream, item_pb2.Item.FromString(m.data)))
                    await m.ack()
                if not msgs or items[-1][0] >= last:
                    break
            await sub.unsubscribe()
    except Exception as exc:  # no catalogue stream yet: content features come later, online
        say(f"no catalogue read from {fnats.CATALOGUE_STREAM} ({exc.__class__.__name__}); continuing without")
    return events, items, nc


def pretrain_learner(
    learner: Learner,
    events: list[tuple[int, event_pb2.Event]],
    items: list[tuple[int, item_pb2.Item]],
    text: TextEncoder | None,
    epochs: int,
    context: int,
) -> None:
    """Content first, then the history folded in, then epochs over every user's sequence."""
    if items:
        vectors = None
        if text is not None and learner.config.model.text_dim:
            say(f"embedding {len(items)} titles with the sentence encoder ...")
            vectors = text.encode([datasets.item_text(i) for _, i in items])
        learner.add_items(items, vectors)
    sequences = learner.absorb_events(events)
    chunks = learner.sequence_chunks(sequences, context=context)
    say(
        f"pre-training on {len(events)} events: {len(learner.users)} users, "
        f"{len(learner.items)} items, {chunks.n_targets} targets in {len(chunks)} sequences, {epochs} epochs"
    )
    start = time.perf_counter()

    def progress(epoch: int, total: int, loss: float) -> None:
        elapsed = time.perf_counter() - start
        say(
            f"  epoch {epoch}/{total}  loss {loss:.1f}  {elapsed:.0f}s elapsed, "
            f"~{elapsed / epoch * (total - epoch):.0f}s left"
        )

    learner.fit(chunks, epochs, progress=progress)


async def run_pretrain(settings: TrainerSettings, command: PretrainCommand) -> int:
    torch.set_num_threads(settings.torch_threads)
    lock = CheckpointLock(settings.checkpoint_dir)
    try:
        lock.acquire()
    except RuntimeError as exc:
        say(f"error: {exc}")
        return 2
    nc = None
    try:
        learner, text = build_learner(settings)
        if command.source == "file":
            if command.file is None:
                say("error: --source file needs --file PATH (u.data or ratings.csv)")
                return 2
            ratings = datasets.time_ordered(datasets.read_ratings(command.file))
            events = datasets.events(ratings)
            items = [(0, i) for i in datasets.read_items(command.items)] if command.items else []
            say(
                f"read {len(ratings)} ratings from {command.file}"
                + (f" and {len(items)} items" if items else "")
            )
        else:
            events, items, nc = await _read_stream(settings)
            if command.items:
                items += [(0, i) for i in datasets.read_items(command.items)]
            say(f"read {len(events)} events and {len(items)} catalogue entries from the streams")
        if not events:
            say("error: no history to pre-train on")
            return 1
        epochs = command.epochs or settings.pretrain_epochs
        await asyncio.to_thread(
            pretrain_learner, learner, events, items, text, epochs, settings.pretrain_context
        )
        checkpoint = CheckpointFile(settings.checkpoint_dir)
        if checkpoint.load() is not None:
            say(f"replacing the existing checkpoint in {settings.checkpoint_dir}")
        if command.publish:
            if nc is None and settings.model_store is None:  # the version goes to the Object Store
                nc = await fnats.connect(settings.nats, name="freshrec-trainer-pretrain")
            await _publish(settings, learner, nc)
        checkpoint.save(to_bytes(learner))
        say(f"checkpoint written to {checkpoint.path}; start the trainer service to learn online from here")
        return 0
    finally:
        if nc is not None:
            await nc.drain()
        lock.release()


async def _publish(settings: TrainerSettings, learner: Learner, nc: Any) -> None:
    engine = make_engine(settings.database)
    try:
        await asyncio.to_thread(upgrade_schema, engine, MIGRATIONS, VERSION_TABLE)
        registry = Registry(make_sessionmaker(engine))
        store = ModelStore(settings.model_folder())
        exported = await asyncio.to_thread(export_learner, learner, None, item_tower=settings.item_tower)
        version = next_version([*registry.versions(), *store.list_versions()])
        key = load_private_key(settings.signing_key_file) if settings.signing_key_file else None
        stored = store.write_version(version, exported.files, exported.manifest, key)
        bucket = await ModelBucket.open(nc.jetstream()) if settings.model_store is None else None
        if bucket is not None:
            await bucket.put_version(stored)
        WeightSnapshots(settings.checkpoint_dir).save(version, snapshot(learner))
        trained = exported.manifest["trained_through"]
        row = registry.add(
            NewVersion(
                version=version,
                parent_version="",
                sha256=stored.manifest["sha256"],
                metrics=exported.manifest["metrics"],
                trained_through_sequence=trained["stream_sequence"],
                trained_through_time=trained["event_time"],
            ),
            LIVE,
        )
        store.set_live(version)
        if bucket is not None:
            await bucket.set_live(version)
        say(f"published {version} (export {exported.seconds:.2f}s) as the live version")
        if nc is not None:
            from freshrec.v1 import trainer_pb2
            from shared.watermark import watermark_proto

            announcement = trainer_pb2.ModelAnnouncement(
                version=row.version,
                sha256=row.sha256,
                reason="pretrained",
                trained_through=watermark_proto(row.trained_through_sequence, row.trained_through_time),
            )
            await nc.publish(fnats.MODELS_PUBLISHED_SUBJECT, announcement.SerializeToString())
    finally:
        engine.dispose()
