"""Wires inference together: the model holder, announcements and polling, the feature client, gRPC."""

from __future__ import annotations

import asyncio
import logging

import grpc

from freshrec.v1 import inference_pb2, inference_pb2_grpc
from services.inference.features import FeatureClient
from services.inference.reloader import ModelHolder
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings
from shared import nats as fnats
from shared.grpc_server import RunningServer, full_service_name, start_grpc_server
from shared.metrics import start_metrics_endpoint
from shared.model_store import ModelStore
from shared.security import make_channel
from shared.signing import load_public_key

logger = logging.getLogger(__name__)

SERVICE_NAME = full_service_name(inference_pb2.DESCRIPTOR, "InferenceService")


class InferenceApp:
    """The running inference service."""

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        self.server: RunningServer | None = None
        self.holder: ModelHolder | None = None

    @property
    def port(self) -> int:
        assert self.server is not None, "not started"
        return self.server.port

    async def start(self) -> None:
        s = self.settings
        public_key = load_public_key(s.verify_key_file) if s.verify_key_file else None
        holder = self.holder = ModelHolder(
            ModelStore(s.model_store), s.keep_versions, s.onnx_threads, public_key
        )
        await holder.sync_with_store()  # serve the newest live model from the first request on

        nc = await fnats.connect(s.nats, name="freshrec-inference")
        await holder.subscribe(nc)
        channel = make_channel(s.feature_addr, s.feature)
        features = FeatureClient(channel, s.feature_deadline_s)

        def register(server: grpc.aio.Server) -> None:
            inference_pb2_grpc.add_InferenceServiceServicer_to_server(
                InferenceServicer(holder, features), server
            )

        self.server = await start_grpc_server(s.grpc, [SERVICE_NAME], register)
        self.server.cleanups += [nc.drain, channel.close]
        self.server.tasks.append(asyncio.create_task(holder.poll(s.poll_interval_s), name="model-poll"))
        if s.metrics.enabled:
            start_metrics_endpoint(s.metrics)
        logger.info(
            "inference listening on %s:%d, serving model %s",
            s.grpc.host,
            self.server.port,
            holder.served_version or "none (popularity fallback)",
        )

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(self.settings.grpc.grace_s)
