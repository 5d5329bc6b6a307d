"""The gRPC face of the trainer: ``freshrec.v1.TrainerService``."""

from __future__ import annotations

import asyncio

import grpc

from freshrec.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.learner import OnlineLearner
from services.trainer.loop import TrainerLoop
from services.trainer.registry import Registry
from shared.model_store import ArtifactError
from shared.watermark import watermark_proto


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, loop: TrainerLoop, learner: OnlineLearner, registry: Registry, strategy: str) -> None:
        self.loop = loop
        self.learner = learner
        self.registry = registry
        self.strategy = strategy

    async def GetTrainerStatus(
        self, request: trainer_pb2.GetTrainerStatusRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.GetTrainerStatusResponse:
        s = self.learner.state
        live = await asyncio.to_thread(self.registry.live)
        response = trainer_pb2.GetTrainerStatusResponse(
            strategy=self.strategy,
            live_version=live.version if live else "",
            events_learned=s.events_learned,
            watermark=watermark_proto(s.stream_sequence, s.event_time),
            metrics=s.prequential.as_metrics(),
            last_export_seconds=self.loop.last_export_seconds,
        )
        if self.loop.last_export_at:
            response.last_export_at.FromNanoseconds(int(self.loop.last_export_at * 1e9))
        return response

    async def TriggerTraining(
        self, request: trainer_pb2.TriggerTrainingRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.TriggerTrainingResponse:
        if request.kind == trainer_pb2.TRAINING_KIND_RETRAIN:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "TRAINING_KIND_RETRAIN is not available in this version; use TRAINING_KIND_EXPORT",
            )
        if self.learner.state.events_learned == 0:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the trainer has learned no events yet; ingest some first",
            )
        row = await self.loop.request_export()
        assert row is not None
        return trainer_pb2.TriggerTrainingResponse(model=row.to_proto())

    async def ListModels(
        self, request: trainer_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ListModelsResponse:
        rows = await asyncio.to_thread(self.registry.newest_first, request.limit)
        live = next((r.version for r in rows if r.status == "LIVE"), "")
        if not live:
            row = await asyncio.to_thread(self.registry.live)
            live = row.version if row else ""
        return trainer_pb2.ListModelsResponse(models=[r.to_proto() for r in rows], live_version=live)

    async def PromoteModel(
        self, request: trainer_pb2.PromoteModelRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.PromoteModelResponse:
        if not request.version:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "version is empty")
        row, previous = await self._make_live(request.version, "promoted", context)
        return trainer_pb2.PromoteModelResponse(model=row.to_proto(), previous_version=previous)

    async def RollbackModel(
        self, request: trainer_pb2.RollbackModelRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.RollbackModelResponse:
        target = request.version
        if not target:
            live = await asyncio.to_thread(self.registry.live)
            if live is None or not live.parent_version:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, "the live version has no parent to roll back to"
                )
            assert live is not None
            target = live.parent_version
        row, previous = await self._make_live(target, "rolled_back", context)
        return trainer_pb2.RollbackModelResponse(model=row.to_proto(), previous_version=previous)

    async def _make_live(self, version: str, reason: str, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        if await asyncio.to_thread(self.registry.get, version) is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model version {version!r} is not in the registry"
            )
        try:
            return await self.loop.make_live(version, reason)
        except ArtifactError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot make {version} live: {exc}")
