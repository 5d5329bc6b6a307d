"""Transport security and authentication for gRPC: TLS / mutual TLS from configuration, and a
bearer-token check as a server interceptor (health checks exempt).

Clients build their channels with ``make_channel`` so the same settings work everywhere.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import Any

import grpc

from shared.interceptors import Continuation, Handler, refusal
from shared.settings import PeerSettings, TlsSettings

logger = logging.getLogger(__name__)

AUTH_METADATA = "authorization"
#: Methods anyone may call: orchestrators probe health without credentials.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def _read(path: Any) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """TLS server credentials, or None for plaintext; a CA file makes client certificates mandatory."""
    if not tls.cert_file:
        if tls.ca_file:
            raise ValueError("the server's tls.ca_file needs tls.cert_file and tls.key_file too")
        return None
    assert tls.key_file is not None
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file), _read(tls.cert_file))],
        root_certificates=_read(tls.ca_file) if tls.ca_file else None,
        require_client_auth=bool(tls.ca_file),
    )


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file) if tls.ca_file else None,
        private_key=_read(tls.key_file) if tls.key_file else None,
        certificate_chain=_read(tls.cert_file) if tls.cert_file else None,
    )


def make_channel(
    address: str, peer: PeerSettings, options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """An aio channel to a peer: TLS when configured, the bearer token on every call when set."""
    interceptors: list[grpc.aio.ClientInterceptor] | None = None
    if peer.token:
        token = peer.token.get_secret_value()
        interceptors = [_UnaryTokenInterceptor(token), _StreamTokenInterceptor(token)]
    if peer.tls.enabled:
        return grpc.aio.secure_channel(
            address, channel_credentials(peer.tls), options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options, interceptors=interceptors)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer token (for clients that add it per call)."""
    return ((AUTH_METADATA, f"Bearer {token}"),)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the configured bearer token: UNAUTHENTICATED, never a hint why."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty auth token would admit everyone")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES) or self._authorised(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        logger.info("refused unauthenticated call to %s", method)
        return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    def _authorised(self, metadata: Any) -> bool:
        presented = b""
        for key, value in metadata or ():
            if key == AUTH_METADATA:
                presented = value.encode() if isinstance(value, str) else value
        # Constant time: the comparison takes as long however much of the token is right.
        return hmac.compare_digest(presented, self._expected)


class _TokenMetadata:
    def __init__(self, token: str) -> None:
        self._metadata = bearer(token)

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files each interceptor under one call type only, hence one class per type.
class _UnaryTokenInterceptor(_TokenMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, Any], Awaitable[grpc.aio.UnaryUnaryCall[Any, Any]]
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> grpc.aio.UnaryUnaryCall[Any, Any]:
        return await continuation(self._with_token(client_call_details), request)


class _StreamTokenInterceptor(_TokenMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, AsyncIterable[Any] | Iterable[Any]],
            Awaitable[grpc.aio.StreamUnaryCall[Any, Any]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> grpc.aio.StreamUnaryCall[Any, Any]:
        return await continuation(self._with_token(client_call_details), request_iterator)
