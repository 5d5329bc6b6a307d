"""Limits are configuration: message size, batch sizes, list sizes, k and id lengths."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from freshrec.v1 import feature_pb2, feature_pb2_grpc, inference_pb2, ingestion_pb2, ingestion_pb2_grpc
from services.feature.server import FeatureApp
from services.feature.settings import FeatureSettings
from services.ingestion.server import IngestionApp
from services.ingestion.settings import IngestionSettings
from tests.conftest import service_settings
from tests.factories import event
from tests.inference.conftest import feature, start_inference  # noqa: F401 - fixtures used below


async def expect_invalid(call, fragment: str, code=grpc.StatusCode.INVALID_ARGUMENT) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code
    assert fragment in (caught.value.details() or ""), caught.value.details()


async def test_inference_request_limits_are_settings(start_inference) -> None:  # noqa: F811
    limits = {"max_k": 5, "max_ids_per_request": 2, "max_id_length": 16, "max_context_entries": 1}
    _app, stub = await start_inference(limits=limits)
    await expect_invalid(stub.Recommend(inference_pb2.RecommendRequest(user_id="u", k=6)), "at most 5")
    assert await stub.Recommend(inference_pb2.RecommendRequest(user_id="u", k=5)) is not None
    await expect_invalid(
        stub.Recommend(inference_pb2.RecommendRequest(user_id="u", exclude_item_ids=["a", "b", "c"])),
        "at most 2",
    )
    await expect_invalid(stub.Recommend(inference_pb2.RecommendRequest(user_id="u" * 17)), "longer than 16")
    await expect_invalid(
        stub.Recommend(inference_pb2.RecommendRequest(user_id="u", context={"a": "1", "b": "2"})), "at most 1"
    )


async def test_feature_request_limits_are_settings(nats_server, tmp_path: Path) -> None:
    settings = service_settings(
        FeatureSettings,
        nats_server,
        tmp_path,
        limits={"max_k": 3, "max_ids_per_request": 2, "max_id_length": 8},
    )
    app = FeatureApp(settings)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = feature_pb2_grpc.FeatureServiceStub(channel)
            await expect_invalid(stub.GetPopularItems(feature_pb2.GetPopularItemsRequest(k=4)), "at most 3")
            await expect_invalid(
                stub.GetItems(feature_pb2.GetItemsRequest(item_ids=["a", "b", "c"])), "at most 2"
            )
            await expect_invalid(
                stub.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id="x" * 9)), "longer than 8"
            )
    finally:
        await app.stop()


async def test_message_size_and_batch_size_are_settings(nats_server, tmp_path: Path) -> None:
    settings = service_settings(
        IngestionSettings,
        nats_server,
        tmp_path,
        max_batch=3,
        grpc={"host": "127.0.0.1", "port": 0, "max_message_bytes": 4096},
    )
    app = IngestionApp(settings)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
            four = [event("u", f"i{n}") for n in range(4)]
            await expect_invalid(stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=four)), "3")
            huge = event("u", "i")
            huge.context["k"] = "v" * 5000
            await expect_invalid(
                stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[huge])),
                "",
                code=grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
    finally:
        await app.stop()
