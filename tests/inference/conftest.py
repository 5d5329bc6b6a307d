"""Fixtures for inference tests: a real feature service, a model store, inference apps on port 0,
and helpers that feed the catalogue stream and the event stream as the feature service and
ingestion would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from freshrec.v1 import (
    event_pb2,
    feature_pb2,
    feature_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    item_pb2,
    trainer_pb2,
)
from services.feature.server import FeatureApp
from services.feature.settings import FeatureSettings
from services.inference.server import InferenceApp
from services.inference.settings import InferenceSettings
from shared.model_store import ModelStore
from shared.nats import (
    CATALOGUE_ACCEPTED_SUBJECT,
    MODELS_PUBLISHED_SUBJECT,
    MSG_ID_HEADER,
    accepted_subject,
    ensure_catalogue_stream,
    ensure_events_stream,
)
from tests.conftest import eventually, service_settings


async def publish_items(nats_client: Any, items: list[item_pb2.Item]) -> None:
    js = nats_client.jetstream()
    await ensure_catalogue_stream(js)
    for item in items:
        await js.publish(CATALOGUE_ACCEPTED_SUBJECT, item.SerializeToString())


async def upsert_items(feature_port: int, items: list[item_pb2.Item]) -> None:
    """Stores items in the feature service's catalogue (its per-category popularity reads it)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{feature_port}") as channel:
        response = await feature_pb2_grpc.FeatureServiceStub(channel).UpsertItems(
            feature_pb2.UpsertItemsRequest(items=items)
        )
    assert response.upserted == len(items), response.errors


async def publish_events(nats_client: Any, events: list[event_pb2.Event]) -> None:
    js = nats_client.jetstream()
    await ensure_events_stream(js)
    for e in events:
        subject = accepted_subject(event_pb2.EventType.Name(e.type), e.user_id)
        await js.publish(subject, e.SerializeToString(), headers={MSG_ID_HEADER: e.event_id})


async def announce(
    nats_client: Any, store: ModelStore, version: str, sha256: str = "", reason: str = "published"
) -> None:
    """What the trainer does to make a version live: move LIVE, then announce it."""
    store.set_live(version)
    msg = trainer_pb2.ModelAnnouncement(version=version, sha256=sha256, reason=reason)
    await nats_client.publish(MODELS_PUBLISHED_SUBJECT, msg.SerializeToString())
    await nats_client.flush()


async def health_status(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return int(response.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def recent_items(feature_port: int, user: str) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{feature_port}") as channel:
        response = await feature_pb2_grpc.FeatureServiceStub(channel).GetUserFeatures(
            feature_pb2.GetUserFeaturesRequest(user_id=user)
        )
    return [i.item_id for i in response.features.recent]


@pytest.fixture
async def feature(nats_server: Any, tmp_path: Path) -> AsyncIterator[FeatureApp]:
    app = FeatureApp(service_settings(FeatureSettings, nats_server, tmp_path))
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


Starter = Callable[..., Awaitable[tuple[InferenceApp, Any]]]


@pytest.fixture
async def start_inference(nats_server: Any, tmp_path: Path, feature: FeatureApp) -> AsyncIterator[Starter]:
    """Starts inference apps (stopped at the end); returns (app, InferenceService stub)."""
    started: list[tuple[InferenceApp, grpc.aio.Channel]] = []

    async def start(**overrides: Any) -> tuple[InferenceApp, Any]:
        values: dict[str, Any] = {"feature_addr": f"127.0.0.1:{feature.port}", "feature_deadline_s": 2.0}
        values.update(overrides)
        app = InferenceApp(service_settings(InferenceSettings, nats_server, tmp_path, **values))
        await app.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        started.append((app, channel))
        return app, inference_pb2_grpc.InferenceServiceStub(channel)

    yield start
    for app, channel in reversed(started):
        await channel.close()
        await app.stop()


async def serving_version(stub: Any, version: str) -> bool:
    info = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
    return bool(info.model_version == version)


async def wait_serving(stub: Any, version: str, timeout_s: float = 30.0) -> None:
    await eventually(lambda: serving_version(stub, version), timeout_s=timeout_s, what=f"{version} served")
