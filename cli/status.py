"""What ``freshrec status`` (and ``freshrec up``) shows: each service replica's health and state."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.clients import Endpoints
from cli.stack import SERVICES
from freshrec.v1 import (
    feature_pb2,
    feature_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from freshrec.v1.watermark_pb2 import Watermark
from shared.security import make_channel
from shared.settings import PeerSettings


@dataclass
class InstanceStatus:
    service: str
    address: str
    health: str
    details: dict[str, str] = field(default_factory=dict)
    metrics_url: str = ""

    @property
    def ok(self) -> bool:
        return self.health == "SERVING"


def describe_watermark(wm: Watermark) -> str:
    if not wm.stream_sequence:
        return "nothing applied yet"
    lag = wm.lag.ToTimedelta().total_seconds()
    return f"seq {wm.stream_sequence}, {format_lag(lag)} behind"


def format_lag(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


async def instance_status(
    service: str, address: str, timeout_s: float = 2.0, peer: PeerSettings | None = None
) -> InstanceStatus:
    async with make_channel(address, peer or PeerSettings()) as channel:
        try:
            # The stubs leave out the methods the generated HealthStub sets in its __init__.
            answer = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
            health = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        except grpc.RpcError as exc:
            code = exc.code()
            health = (
                "UNREACHABLE"
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                else code.name
            )
            return InstanceStatus(service, address, health)
        status = InstanceStatus(service, address, health)
        try:
            status.details = await _details(service, channel, timeout_s)
        except grpc.RpcError as exc:
            status.details = {"error": f"{exc.code().name}: {exc.details()}"}
        return status


async def _details(service: str, channel: grpc.aio.Channel, timeout_s: float) -> dict[str, str]:
    if service == "inference":
        info = await inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(
            inference_pb2.GetModelInfoRequest(), timeout=timeout_s
        )
        if not info.model_version:
            return {"model": "none yet (popularity fallback)"}
        return {
            "model": info.model_version,
            "trained through": describe_watermark(info.trained_through),
            "catalogue": str(info.catalogue_size),
        }
    if service == "trainer":
        status = await trainer_pb2_grpc.TrainerServiceStub(channel).GetTrainerStatus(
            trainer_pb2.GetTrainerStatusRequest(), timeout=timeout_s
        )
        if status.role == trainer_pb2.TRAINER_ROLE_STANDBY:
            return {
                "role": f"standby (leader: {status.leader or 'none right now'})",
                "live model": status.live_version or "none yet",
            }
        details = {
            "live model": status.live_version or "none yet",
            "learned": f"{status.events_learned} events",
            "watermark": describe_watermark(status.watermark),
        }
        for name in ("prequential_hr@10_recent", "prequential_hr@10"):
            if name in status.metrics:
                details[name.replace("prequential_", "")] = f"{status.metrics[name]:.3f}"
                break
        return details
    if service == "feature":
        popular = await feature_pb2_grpc.FeatureServiceStub(channel).GetPopularItems(
            feature_pb2.GetPopularItemsRequest(k=1), timeout=timeout_s
        )
        return {"watermark": describe_watermark(popular.watermark)}
    return {}


async def stack_status(endpoints: Endpoints) -> list[InstanceStatus]:
    jobs = []
    for service in SERVICES:
        for n, address in enumerate(endpoints.services[service]):
            jobs.append((service, address, n))
    results = await asyncio.gather(*(instance_status(s, a, peer=endpoints.peer) for s, a, _ in jobs))
    for (service, _address, n), status in zip(jobs, results, strict=True):
        urls = endpoints.metrics.get(service, [])
        status.metrics_url = urls[n] if n < len(urls) else ""
    return list(results)


def as_json(statuses: list[InstanceStatus]) -> str:
    return json.dumps(
        [
            {
                "service": s.service,
                "address": s.address,
                "health": s.health,
                "metrics": s.metrics_url,
                **s.details,
            }
            for s in statuses
        ],
        indent=2,
    )
