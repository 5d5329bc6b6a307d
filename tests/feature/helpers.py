"""Helpers of the feature tests: publish events as ingestion does, call the service, compare states."""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path
from typing import Any

import grpc
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from freshrec.v1 import event_pb2, feature_pb2_grpc
from services.feature.pull import Puller, stream_position
from services.feature.server import FeatureApp
from services.feature.settings import FeatureSettings
from services.feature.state import FeatureState
from services.feature.store import FeatureStore
from shared.db import make_engine, make_sessionmaker
from shared.nats import EVENTS_STREAM, MSG_ID_HEADER, accepted_subject, ensure_events_stream
from tests.conftest import eventually, service_settings
from tests.factories import event

T0 = 1_700_000_000.0
KINDS = [
    event_pb2.EVENT_TYPE_VIEW,
    event_pb2.EVENT_TYPE_VIEW,
    event_pb2.EVENT_TYPE_CLICK,
    event_pb2.EVENT_TYPE_ADD_TO_CART,
    event_pb2.EVENT_TYPE_PURCHASE,
    event_pb2.EVENT_TYPE_RATE,
    event_pb2.EVENT_TYPE_DISLIKE,
]


def workload(
    n: int, users: int = 40, items: int = 60, seed: int = 0, start: float = T0
) -> list[event_pb2.Event]:
    """A mixed stream: several types, ratings, out-of-order times, repeats, and one bot."""
    rng = random.Random(seed)
    events = []
    for k in range(n):
        if rng.random() < 0.15:
            user, at = "bot", start + k * 0.01  # far above the default bound of 120 events a minute
        else:
            user, at = f"u{rng.randrange(users)}", start + k * 2 + rng.uniform(-20, 20)
        kind = rng.choice(KINDS)
        item = f"i{min(int(rng.paretovariate(1.2)), items)}" if rng.random() < 0.9 else "i1"
        value = float(rng.randint(1, 5)) if kind == event_pb2.EVENT_TYPE_RATE else 0.0
        events.append(event(user, item, event_id=f"e{seed}-{k}", type=kind, at=at, value=value))
    return events


async def publish(nats_client: Any, events: list[event_pb2.Event]) -> None:
    """Publishes like ingestion: partitioned subject, Nats-Msg-Id, pipelined acks."""
    js = nats_client.jetstream()
    await ensure_events_stream(js)
    futures = []
    for e in events:
        subject = accepted_subject(event_pb2.EventType.Name(e.type), e.user_id)
        futures.append(
            await js.publish_async(
                subject, e.SerializeToString(), headers={MSG_ID_HEADER: e.event_id}, stream=EVENTS_STREAM
            )
        )
        if len(futures) >= 2000:
            await asyncio.gather(*futures)
            futures = []
    await asyncio.gather(*futures)


async def accepted_times(nats_client: Any, event_ids: list[str]) -> list[float]:
    """When the stream accepted each of its events (Unix seconds), checked to be these events in
    this order: what a consumer passes to ``FeatureState.apply``."""
    js = nats_client.jetstream()
    name = f"accepted-{uuid.uuid4().hex[:8]}"
    await js.add_consumer(
        EVENTS_STREAM,
        ConsumerConfig(
            name=name, ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0
        ),
    )
    puller = await Puller(nats_client, EVENTS_STREAM, name).start()
    got: list[tuple[str, float]] = []
    try:
        while len(got) < len(event_ids):
            msgs = await puller.fetch(len(event_ids) - len(got), 2.0)
            assert msgs, f"the stream holds {len(got)} events, not {len(event_ids)}"
            got += [
                (event_pb2.Event.FromString(m.data).event_id, stream_position(m.reply)[1] / 1e9) for m in msgs
            ]
    finally:
        await puller.close()
        await js.delete_consumer(EVENTS_STREAM, name)
    assert [i for i, _ in got] == event_ids
    return [t for _, t in got]


async def last_sequence(nats_client: Any) -> int:
    info = await nats_client.jetstream().stream_info(EVENTS_STREAM)
    return int(info.state.last_seq)


def settings_for(
    nats_server: Any, tmp_path: Path, name: str = "feature", **overrides: Any
) -> FeatureSettings:
    settings: FeatureSettings = service_settings(FeatureSettings, nats_server, tmp_path, **overrides)
    if "database" in overrides:
        return settings
    return settings.model_copy(
        update={"database": settings.database.model_copy(update={"url": f"sqlite:///{tmp_path / name}.db"})}
    )


async def started(settings: FeatureSettings) -> FeatureApp:
    app = FeatureApp(settings)
    await app.start()
    return app


async def caught_up(app: FeatureApp, sequence: int, timeout_s: float = 60.0) -> None:
    async def done() -> bool:
        assert app.state is not None
        return app.state.watermark.stream_sequence >= sequence

    await eventually(done, timeout_s=timeout_s, what=f"feature state at stream sequence {sequence}")


def stub(app: FeatureApp) -> tuple[grpc.aio.Channel, feature_pb2_grpc.FeatureServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return channel, feature_pb2_grpc.FeatureServiceStub(channel)


def stored_state(settings: FeatureSettings) -> dict[str, Any]:
    """The state a fresh start would load from SQL, dumped."""
    engine = make_engine(settings.database)
    try:
        state = FeatureState(
            settings.recent_items, settings.preprocessing, settings.popularity, settings.seen_items
        )
        FeatureStore(make_sessionmaker(engine), settings.replica_name).load(state)
        return state.dump()
    finally:
        engine.dispose()
