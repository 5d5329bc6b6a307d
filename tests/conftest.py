"""Fixtures on real parts: a private nats-server with JetStream per test (from tests.harness),
SQLite in tmp folders, in-process gRPC servers on ephemeral ports. Nothing of freshrec's own is
mocked."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import NatsServer

ML100K = Path(os.environ.get("FRESHREC_ML100K", Path(__file__).resolve().parents[2] / "shared/data/ml-100k"))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def nats_client(nats_server: NatsServer) -> AsyncIterator[Any]:
    import nats

    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


async def eventually(
    check: Callable[[], Awaitable[Any]],
    timeout_s: float = 20.0,
    interval_s: float = 0.05,
    what: str = "condition",
) -> Any:
    """Polls an async check until it returns something truthy (no fixed sleeps in tests)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value: {last!r}")


def service_settings(settings_cls: Any, nats_server: NatsServer, tmp_path: Path, **overrides: Any) -> Any:
    """Settings for an in-process service on an ephemeral port, with SQLite and stores in tmp_path."""
    fields = settings_cls.model_fields
    values: dict[str, Any] = {
        "nats": {"url": nats_server.url},
        "grpc": {"host": "127.0.0.1", "port": 0, "grace_s": 2.0},
        "metrics": {"enabled": False},
    }
    if "database" in fields:
        values["database"] = {"url": f"sqlite:///{tmp_path / (settings_cls.__name__ + '.db')}"}
    if "model_store" in fields:
        values["model_store"] = tmp_path / "models"
    if "checkpoint_dir" in fields:
        values["checkpoint_dir"] = tmp_path / "checkpoint"
    values.update(overrides)
    return settings_cls(**values)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (needs FRESHREC_TEST_POSTGRES_URL; .ci/run sets it)."""
    base = os.environ.get("FRESHREC_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("FRESHREC_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))  # a generated identifier, not user input
    yield make_url(base).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
