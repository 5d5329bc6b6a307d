"""TLS, mutual TLS and bearer tokens on real gRPC servers (the feature and ingestion services),
with a throw-away CA made in the test."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from freshrec.v1 import feature_pb2, feature_pb2_grpc, ingestion_pb2_grpc
from services.feature.server import FeatureApp
from services.feature.settings import FeatureSettings
from services.ingestion.server import IngestionApp
from services.ingestion.settings import IngestionSettings
from shared.security import make_channel
from shared.settings import PeerSettings, TlsSettings
from tests.conftest import service_settings
from tests.factories import event
from tests.security.certs import make_pki

TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def pki(tmp_path: Path):  # type: ignore[no-untyped-def]
    return make_pki(tmp_path / "pki")


async def call_user_features(channel: grpc.aio.Channel) -> feature_pb2.GetUserFeaturesResponse:
    return await feature_pb2_grpc.FeatureServiceStub(channel).GetUserFeatures(
        feature_pb2.GetUserFeaturesRequest(user_id="u"), timeout=5
    )


async def test_tls_server_refuses_plaintext_and_serves_tls_clients(nats_server, tmp_path, pki) -> None:
    tls = {"cert_file": pki.server.cert, "key_file": pki.server.key}
    app = FeatureApp(
        service_settings(
            FeatureSettings, nats_server, tmp_path, grpc={"host": "127.0.0.1", "port": 0, "tls": tls}
        )
    )
    await app.start()
    address = f"127.0.0.1:{app.port}"
    try:
        async with make_channel(address, PeerSettings(tls=TlsSettings(ca_file=pki.ca))) as channel:
            assert not (await call_user_features(channel)).features.known
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call_user_features(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client trusting another CA does not accept this server.
        async with make_channel(address, PeerSettings(tls=TlsSettings(ca_file=pki.other_ca))) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call_user_features(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await app.stop()


async def test_mutual_tls_requires_a_client_certificate(nats_server, tmp_path, pki) -> None:
    tls = {"cert_file": pki.server.cert, "key_file": pki.server.key, "ca_file": pki.ca}
    app = FeatureApp(
        service_settings(
            FeatureSettings, nats_server, tmp_path, grpc={"host": "127.0.0.1", "port": 0, "tls": tls}
        )
    )
    await app.start()
    address = f"127.0.0.1:{app.port}"
    try:
        with_cert = TlsSettings(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
        async with make_channel(address, PeerSettings(tls=with_cert)) as channel:
            await call_user_features(channel)
        async with make_channel(address, PeerSettings(tls=TlsSettings(ca_file=pki.ca))) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call_user_features(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await app.stop()


async def test_token_auth_guards_every_rpc_but_health(nats_server, tmp_path) -> None:
    settings = service_settings(
        IngestionSettings, nats_server, tmp_path, grpc={"host": "127.0.0.1", "port": 0, "auth_token": TOKEN}
    )
    app = IngestionApp(settings)
    await app.start()
    address = f"127.0.0.1:{app.port}"

    async def one_event():  # type: ignore[no-untyped-def]
        yield event("u", "i", event_id="auth-1")

    try:
        for peer in (PeerSettings(), PeerSettings(token="wrong-token"), PeerSettings(token=TOKEN[:-1])):
            async with make_channel(address, peer) as channel:
                stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
                for call in (stub.IngestEvents(_request()), stub.IngestEventStream(one_event())):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert TOKEN not in (caught.value.details() or "")
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert health.status == health_pb2.HealthCheckResponse.SERVING
        async with make_channel(address, PeerSettings(token=TOKEN)) as channel:
            stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
            assert (await stub.IngestEvents(_request())).accepted == 1
            assert (await stub.IngestEventStream(one_event())).duplicates == 1
    finally:
        await app.stop()


def _request():  # type: ignore[no-untyped-def]
    from freshrec.v1 import ingestion_pb2

    return ingestion_pb2.IngestEventsRequest(events=[event("u", "i", event_id="auth-1")])


async def test_healthcheck_speaks_tls_when_the_server_does(nats_server, tmp_path, pki) -> None:
    tls = {"cert_file": pki.server.cert, "key_file": pki.server.key, "ca_file": pki.ca}
    grpc_settings = {"host": "127.0.0.1", "port": 0, "tls": tls}
    app = FeatureApp(service_settings(FeatureSettings, nats_server, tmp_path, grpc=grpc_settings))
    await app.start()

    def probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "shared.healthcheck", f"127.0.0.1:{app.port}", "--timeout", "10"]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)

    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
        plain = await asyncio.to_thread(probe, env)
        assert plain.returncode == 1  # a plaintext probe of a TLS port fails
        # In a container the check reads the service's own settings; mutual TLS here.
        env |= {
            "FRESHREC_GRPC__TLS__CERT_FILE": str(pki.client.cert),
            "FRESHREC_GRPC__TLS__KEY_FILE": str(pki.client.key),
            "FRESHREC_GRPC__TLS__CA_FILE": str(pki.ca),
        }
        secured = await asyncio.to_thread(probe, env)
        assert secured.returncode == 0, secured.stderr
        assert "SERVING" in secured.stdout
    finally:
        await app.stop()
