"""``python -m shared.healthcheck HOST:PORT``: exit 0 when the gRPC server there is SERVING.

Container health checks call this instead of probing a port, so "healthy" means the service
says it can serve (``grpc.health.v1``), not merely that a socket is open. When the service's
own gRPC server uses TLS (``FRESHREC_GRPC__TLS__CERT_FILE`` is set in the container), the check
speaks TLS too: it trusts ``FRESHREC_GRPC__TLS__CA_FILE`` (else the system roots); when that CA
makes the server require client certificates it presents the service's own certificate (issue it
for client authentication as well as server authentication); ``--server-name`` names the
certificate's host when it is not the address dialled.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.security import channel_credentials
from shared.settings import TlsSettings


def tls_from_environment() -> TlsSettings | None:
    """The client side of the service's own server TLS settings, or None for plaintext."""
    cert = os.environ.get("FRESHREC_GRPC__TLS__CERT_FILE")
    if not cert:
        return None
    ca = os.environ.get("FRESHREC_GRPC__TLS__CA_FILE")
    key = os.environ.get("FRESHREC_GRPC__TLS__KEY_FILE")
    if ca and key:  # mutual TLS: the server wants a client certificate signed by that CA
        return TlsSettings(ca_file=Path(ca), cert_file=Path(cert), key_file=Path(key))
    return TlsSettings(ca_file=Path(ca) if ca else None)


def check(
    address: str,
    service: str = "",
    timeout_s: float = 2.0,
    tls: TlsSettings | None = None,
    server_name: str | None = None,
) -> str:
    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else None
        channel = grpc.secure_channel(address, channel_credentials(tls), options)
    with channel:
        # The stubs leave out the methods the generated HealthStub sets in its __init__.
        response = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.healthcheck", description=__doc__)
    parser.add_argument("address", help="host:port of a freshrec gRPC server")
    parser.add_argument("--service", default="", help="a fully qualified service name (default: the server)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    parser.add_argument("--server-name", default=None, help="the name the server's TLS certificate carries")
    args = parser.parse_args()
    try:
        status = check(args.address, args.service, args.timeout, tls_from_environment(), args.server_name)
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name}", file=sys.stderr)
        return 1
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
