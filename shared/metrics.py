"""Prometheus metrics shared by every service: the HTTP endpoint and per-RPC figures."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import grpc
from prometheus_client import Counter, Histogram, start_http_server

from shared.settings import MetricsSettings

logger = logging.getLogger(__name__)

RPC_LATENCY = Histogram(
    "freshrec_rpc_latency_seconds",
    "Server-side latency of each gRPC method.",
    ["method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RPC_TOTAL = Counter("freshrec_rpc_total", "gRPC calls by method and status code.", ["method", "code"])
GC_PAUSE = Histogram(
    "freshrec_gc_pause_seconds",
    "Pauses of Python's cyclic garbage collector by generation (every thread of the process waits).",
    ["generation"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1),
)
_gc_started = 0.0


def _time_gc(phase: str, info: dict[str, int]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - _gc_started)


def start_metrics_endpoint(settings: MetricsSettings) -> int | None:
    """Serves /metrics over HTTP in a background thread; returns the bound port."""
    if not settings.enabled:
        return None
    if _time_gc not in gc.callbacks:
        gc.callbacks.append(_time_gc)
    server, _thread = start_http_server(settings.port, addr=settings.host)
    port = int(server.server_port)
    logger.info("metrics on http://%s:%d/metrics", settings.host, port)
    return port


def code_name(code: Any) -> str:
    """A call's status code as its name (``OK`` when the method returned normally)."""
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return str(code)
