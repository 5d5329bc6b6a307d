"""Fixtures of the ingestion tests: in-process apps on real NATS and SQLite (or PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from freshrec.v1 import ingestion_pb2_grpc
from services.ingestion.server import IngestionApp
from services.ingestion.settings import IngestionSettings
from tests.conftest import service_settings
from tests.harness import NatsServer

AppFactory = Callable[..., Awaitable[IngestionApp]]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The event log's database: SQLite in tmp_path, and (marked postgres) a fresh PostgreSQL one.

    Ask for it before ``make_app`` so the database outlives the apps (teardown runs in reverse)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ingestion.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture
async def make_app(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[AppFactory]:
    """Starts in-process ingestion apps (stopped at the end); keyword arguments override settings."""
    apps: list[IngestionApp] = []

    async def start(**overrides: Any) -> IngestionApp:
        overrides.setdefault("database", {"url": f"sqlite:///{tmp_path / 'ingestion.db'}"})
        overrides.setdefault("relay_interval_s", 0.2)
        overrides.setdefault("replica_name", f"test-{len(apps)}")
        app = IngestionApp(service_settings(IngestionSettings, nats_server, tmp_path, **overrides))
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in reversed(apps):
        await app.stop()


def stub_for(app: IngestionApp) -> tuple[grpc.aio.Channel, ingestion_pb2_grpc.IngestionServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return channel, ingestion_pb2_grpc.IngestionServiceStub(channel)
