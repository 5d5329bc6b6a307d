"""NATS credentials and TLS from configuration, against a real nats-server that requires both."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from freshrec.v1 import ingestion_pb2, ingestion_pb2_grpc
from services.ingestion.server import IngestionApp
from services.ingestion.settings import IngestionSettings
from shared.nats import EVENTS_STREAM, connect
from shared.settings import NatsSettings, TlsSettings
from tests.factories import event
from tests.harness import NatsServer
from tests.security.certs import make_pki

PASSWORD = "n4ts-pa55word"


@pytest.fixture
def secured_nats(tmp_path: Path):  # type: ignore[no-untyped-def]
    pki = make_pki(tmp_path / "pki")
    config = f"""
authorization {{ user: freshrec, password: "{PASSWORD}" }}
tls {{ cert_file: "{pki.server.cert}", key_file: "{pki.server.key}", ca_file: "{pki.ca}", timeout: 2 }}
"""
    server = NatsServer(tmp_path / "nats", config=config)
    server.start()
    yield server, pki
    server.stop()


async def test_services_connect_with_credentials_over_tls(secured_nats, tmp_path: Path) -> None:
    server, pki = secured_nats
    nats = {"url": server.url, "user": "freshrec", "password": PASSWORD, "tls": {"ca_file": pki.ca}}
    settings = IngestionSettings(
        nats=nats,
        grpc={"host": "127.0.0.1", "port": 0},
        metrics={"enabled": False},
        database={"url": f"sqlite:///{tmp_path / 'ingestion.db'}"},
    )
    app = IngestionApp(settings)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            response = await ingestion_pb2_grpc.IngestionServiceStub(channel).IngestEvents(
                ingestion_pb2.IngestEventsRequest(events=[event("u", "i", event_id="secure-1")])
            )
        assert response.accepted == 1
        nc = await connect(NatsSettings(**nats), name="test")
        info = await nc.jetstream().stream_info(EVENTS_STREAM)
        assert info.state.messages == 1
        await nc.close()
    finally:
        await app.stop()


@pytest.mark.parametrize(
    "settings",
    [
        {"user": "freshrec", "password": "wrong", "tls": {"ca_file": "CA"}},
        {"tls": {"ca_file": "CA"}},
        {"user": "freshrec", "password": PASSWORD, "tls": {"ca_file": "OTHER"}},
    ],
    ids=["wrong password", "no credentials", "untrusted server certificate"],
)
async def test_bad_credentials_or_trust_are_refused(secured_nats, settings) -> None:
    server, pki = secured_nats
    tls = {"ca_file": {"CA": pki.ca, "OTHER": pki.other_ca}[settings["tls"]["ca_file"]]}
    nats = NatsSettings(
        **{
            **settings,
            "tls": TlsSettings(**tls),
            "url": server.url,
            "connect_timeout_s": 1,
            "connect_attempts": 2,
        }
    )
    with pytest.raises(ConnectionError, match="cannot connect to NATS") as caught:
        nc = await asyncio.wait_for(connect(nats, name="test"), timeout=20)
        await nc.close()
    assert PASSWORD not in str(caught.value)
