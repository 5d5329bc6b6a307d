"""``python -m services.feature rebuild``: recompute this replica's features from the event log.

The SQL ``events`` table belongs to ingestion, so the log replayed is the stream
``FRESHREC_EVENTS``, which keeps every accepted event (limits retention, no age limit). An
ephemeral consumer with this replica's subject filters reads it from sequence 1 through the
same code the live consumer runs (``FeatureState.apply``) into fresh state, which then
replaces the stored state and stream position in one transaction. The catalogue (the source
of item categories) is read first and kept as it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from freshrec.v1 import event_pb2
from services.feature.pull import Puller, pending_after, stream_position
from services.feature.settings import FeatureSettings
from services.feature.state import FeatureState
from services.feature.store import FeatureStore
from shared import nats as fnats
from shared.db import make_engine, make_sessionmaker, upgrade_schema

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_feature"


class ReplicaRunning(RuntimeError):
    """The replica being rebuilt looks alive (its durable consumer has a waiting pull)."""


async def _refuse_if_running(js: JetStreamContext, durable: str, samples: int = 4) -> None:
    """A running replica always has a pull request waiting on its durable consumer (each fetch
    lingers up to fetch-wait-s and is renewed at once), so a few looks over ~1.5 s find it."""
    for n in range(samples):
        try:
            info = await js.consumer_info(fnats.EVENTS_STREAM, durable)
        except NotFoundError:
            return
        if info.num_waiting:
            raise ReplicaRunning(
                f"replica {durable} seems to be running (its consumer has a waiting pull); "
                "stop it first, or pass --force"
            )
        if n + 1 < samples:
            await asyncio.sleep(0.5)


async def rebuild(settings: FeatureSettings, batch: int = 5000, force: bool = False) -> FeatureState:
    """Replays the stream into fresh state and swaps it in; returns the new state."""
    started = time.monotonic()
    engine = make_engine(settings.database)
    nc = None
    try:
        await asyncio.to_thread(upgrade_schema, engine, MIGRATIONS, VERSION_TABLE)
        store = FeatureStore(make_sessionmaker(engine), settings.replica_name)
        state = FeatureState(
            settings.recent_items, settings.preprocessing, settings.popularity, settings.seen_items
        )
        await asyncio.to_thread(store.load, state, features=False)

        nc = await fnats.connect(settings.nats, name="freshrec-feature-rebuild")
        js = nc.jetstream()
        await fnats.ensure_events_stream(js)
        if not force:
            await _refuse_if_running(js, settings.replica_name)
        filters = settings.partition.filter_subjects()
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
            inactive_threshold=60.0,
        )
        name = f"{settings.replica_name}-rebuild-{uuid.uuid4().hex[:8]}"
        config.name = name
        info = await js.add_consumer(fnats.EVENTS_STREAM, config)
        puller = await Puller(nc, fnats.EVENTS_STREAM, name).start()
        try:
            remaining = info.num_pending or 0
            total = remaining
            logger.info("replaying %d events of %s", total, fnats.EVENTS_STREAM)
            applied = 0
            next_report = time.monotonic() + 5
            while remaining > 0:
                msgs = await puller.fetch(batch, 1.0)
                if not msgs:
                    remaining = (await js.consumer_info(fnats.EVENTS_STREAM, name)).num_pending or 0
                    continue
                for msg in msgs:
                    event = event_pb2.Event()
                    event.ParseFromString(msg.data)
                    sequence, accepted_ns = stream_position(msg.reply)
                    state.apply(event, sequence, accepted_ns / 1e9)
                applied += len(msgs)
                remaining = pending_after(msgs[-1].reply)
                if time.monotonic() > next_report:
                    logger.info("replayed %d of %d events", applied, total)
                    next_report = time.monotonic() + 5
        finally:
            await puller.close()
            try:
                await js.delete_consumer(fnats.EVENTS_STREAM, name)
            except Exception:  # it expires on its own after inactive_threshold
                logger.debug("could not delete the replay consumer", exc_info=True)
        state.preprocessor.take_counts()
        state.dirty_users.clear()
        state.dirty_items.clear()
        await asyncio.to_thread(store.replace_all, state)
        logger.info(
            "rebuilt %d users and %d items through stream sequence %d in %.1f s",
            len(state.users),
            len(state.items),
            state.watermark.stream_sequence,
            time.monotonic() - started,
        )
        return state
    finally:
        if nc is not None:
            await nc.drain()
        engine.dispose()
