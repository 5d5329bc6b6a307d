"""Property-based fuzzing of every RPC of every service, on the real stack (real processes): any
request at all gets an answer that is not UNKNOWN or INTERNAL, and every server stays up."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.stack import Stack
from freshrec.v1 import (
    event_pb2,
    feature_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from freshrec.v1 import feature_pb2 as _feature_pb2  # noqa: F401 - registers the messages
from tests.security.protofuzz import messages

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SERVICES = {
    "ingestion": (ingestion_pb2, ingestion_pb2_grpc.IngestionServiceStub, "IngestionService"),
    "feature": (_feature_pb2, feature_pb2_grpc.FeatureServiceStub, "FeatureService"),
    "trainer": (trainer_pb2, trainer_pb2_grpc.TrainerServiceStub, "TrainerService"),
    "inference": (inference_pb2, inference_pb2_grpc.InferenceServiceStub, "InferenceService"),
}
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def every_rpc() -> list[tuple[str, str]]:
    return [
        (service, method.name)
        for service, (module, _stub, name) in SERVICES.items()
        for method in module.DESCRIPTOR.services_by_name[name].methods
    ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):  # type: ignore[no-untyped-def]
    root: Path = tmp_path_factory.mktemp("fuzz")
    s = Stack(
        root / "var",
        ports=dict.fromkeys(("nats", "ingestion", "feature", "trainer", "inference"), 0),
        extra_env={"trainer": {"FRESHREC_EXPORT_INTERVAL_S": "1"}},
        log_dir=root / "logs",
    )
    s.start()
    # Some real state first, so the fuzzed calls reach the model and feature paths too.
    with grpc.insecure_channel(s.address("ingestion")) as channel:
        events = []
        for n in range(200):
            e = event_pb2.Event(event_id=f"seed-{n}", user_id=f"u{n % 20}", item_id=f"i{n % 30}")
            e.type = event_pb2.EVENT_TYPE_CLICK
            e.occurred_at.GetCurrentTime()
            events.append(e)
        ingestion_pb2_grpc.IngestionServiceStub(channel).IngestEvents(
            ingestion_pb2.IngestEventsRequest(events=events), timeout=30
        )
    with grpc.insecure_channel(s.address("inference")) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        deadline = time.monotonic() + 120
        while not stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10).model_version:
            assert time.monotonic() < deadline, "no model was served for the fuzzing run"
            time.sleep(0.5)
    yield s
    s.stop()


@pytest.mark.parametrize("service, method", every_rpc())
def test_no_request_makes_a_server_fail(stack: Stack, service: str, method: str) -> None:
    module, stub_class, name = SERVICES[service]
    descriptor = module.DESCRIPTOR.services_by_name[name].methods_by_name[method]
    requests = messages(descriptor.input_type)
    if descriptor.client_streaming:
        requests = st.lists(requests, max_size=20)
    channel = grpc.insecure_channel(stack.address(service))
    call = getattr(stub_class(channel), method)
    seen: dict[str, int] = {}

    @FUZZ
    @given(request=requests)
    def check(request) -> None:  # type: ignore[no-untyped-def]
        try:
            call(iter(request) if descriptor.client_streaming else request, timeout=30)
            seen["OK"] = seen.get("OK", 0) + 1
        except grpc.RpcError as exc:
            code = exc.code()
            seen[code.name] = seen.get(code.name, 0) + 1
            assert code not in FORBIDDEN, f"{service}.{method} answered {code.name}: {exc.details()}"
            assert code != grpc.StatusCode.UNAVAILABLE, f"{service} became unavailable: {exc.details()}"

    try:
        check()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert stack.services[service].process.poll() is None, f"{service} exited"
    finally:
        channel.close()
    print(f"{service}.{method}: {seen}")
