"""Finding a running freshrec and talking to it, with errors that say what to do.

Addresses come, in this order, from a command-line option or its ``FRESHREC_<SERVICE>_ADDR``
variable, from the ``stack.json`` that ``freshrec up`` writes into its data folder, or from the
default ports (ingestion 50051, feature 50052, trainer 50053, inference 50054).
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from cli.stack import DEFAULT_PORTS, SERVICES, STATE_FILE
from shared.security import make_channel
from shared.settings import PeerSettings

T = TypeVar("T")


class CliError(Exception):
    """A failure to show the user as one line: what went wrong, then what to do."""


@dataclass
class Endpoints:
    """Where each service (every replica) and NATS can be reached."""

    services: dict[str, list[str]]
    nats: str = f"nats://127.0.0.1:{DEFAULT_PORTS['nats']}"
    metrics: dict[str, list[str]] = field(default_factory=dict)
    source: str = "default ports"
    #: TLS and bearer token for calls, when the services require them.
    peer: PeerSettings = field(default_factory=PeerSettings)

    def first(self, service: str) -> str:
        return self.services[service][0]

    def channel(self, address: str) -> grpc.aio.Channel:
        return make_channel(address, self.peer)


def read_state(data_dir: Path) -> dict[str, Any] | None:
    """The ``stack.json`` a running ``freshrec up`` wrote, or None if absent or its owner is gone."""
    path = Path(data_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    pid = state.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None
    return dict(state)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve(
    data_dir: Path, overrides: dict[str, str | None] | None = None, peer: PeerSettings | None = None
) -> Endpoints:
    """Endpoints from explicit options/env first, then a running stack's state file, then defaults."""
    overrides = overrides or {}
    state = read_state(data_dir)
    if state:
        services = {name: [r["address"] for r in state["services"][name]] for name in SERVICES}
        metrics = {name: [r["metrics"] for r in state["services"][name]] for name in SERVICES}
        endpoints = Endpoints(services, state["nats"], metrics, f"{Path(data_dir) / STATE_FILE}")
    else:
        services = {name: [f"127.0.0.1:{DEFAULT_PORTS[name]}"] for name in SERVICES}
        endpoints = Endpoints(services)
    for name in SERVICES:
        explicit = overrides.get(name) or os.environ.get(f"FRESHREC_{name.upper()}_ADDR")
        if explicit:
            endpoints.services[name] = [a.strip() for a in explicit.split(",") if a.strip()]
            endpoints.source = "options"
    nats_url = overrides.get("nats") or os.environ.get("FRESHREC_NATS__URL")
    if nats_url:
        endpoints.nats = nats_url
    if peer is not None:
        endpoints.peer = peer
    return endpoints


def explain(exc: grpc.RpcError, service: str, address: str) -> CliError:
    """Turns a gRPC failure into a sentence with a next step."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CliError(
            f"cannot reach {service} at {address}: is the stack up? run `freshrec up` "
            f"(or point to it with --{service} HOST:PORT / FRESHREC_{service.upper()}_ADDR)"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CliError(f"{service} at {address} refused the call: {details}; check the token setting")
    name = code.name if code is not None else "ERROR"
    return CliError(f"{service} at {address} answered {name}: {details}")


async def call(service: str, address: str, rpc: Awaitable[T]) -> T:
    """Awaits one RPC, turning gRPC errors into a CliError that names the service and a next step."""
    try:
        return await rpc
    except grpc.RpcError as exc:
        raise explain(exc, service, address) from exc
