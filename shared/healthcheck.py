"""``python -m shared.healthcheck HOST:PORT``: exit 0 when the gRPC server there is SERVING.

Container health checks call this instead of probing a port, so "healthy" means the service
says it can serve (``grpc.health.v1``), not merely that a socket is open.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 2.0) -> str:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.healthcheck", description=__doc__)
    parser.add_argument("address", help="host:port of a freshrec gRPC server")
    parser.add_argument("--service", default="", help="a fully qualified service name (default: the server)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = parser.parse_args()
    try:
        status = check(args.address, args.service, args.timeout)
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name}", file=sys.stderr)
        return 1
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
