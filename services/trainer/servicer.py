"""The gRPC face of the trainer: ``freshrec.v1.TrainerService``."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import grpc

from freshrec.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.leadership import Lease, LostLease
from services.trainer.loop import TrainerLoop
from services.trainer.registry import LIVE, ModelRow, Registry
from services.trainer.settings import TrainerSettings
from shared.model_store import ArtifactError
from shared.watermark import watermark_proto

MAX_VERSION_LENGTH = 64


class Role(Protocol):
    """What the servicer reads of the running trainer: the loop while it leads, and the lease."""

    loop: TrainerLoop | None
    lease: Lease | None


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, role: Role, registry: Registry, settings: TrainerSettings) -> None:
        self.role = role
        self.registry = registry
        self.settings = settings

    async def _leader_name(self) -> str:
        lease = self.role.lease
        if lease is None:
            return self.settings.replica
        holder = await lease.holder()
        return f"{holder.name} ({holder.address})" if holder else ""

    async def _leading_loop(self, context: grpc.aio.ServicerContext[Any, Any]) -> TrainerLoop:
        """The loop, when this trainer leads; FAILED_PRECONDITION naming the leader otherwise."""
        loop, lease = self.role.loop, self.role.lease
        if loop is None or (lease is not None and not lease.leading):
            leader = await self._leader_name()
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"trainer {self.settings.replica} stands by; "
                + (f"send this to the leader, trainer {leader}" if leader else "no trainer leads right now"),
            )
        assert loop is not None
        return loop

    async def GetTrainerStatus(
        self, request: trainer_pb2.GetTrainerStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trainer_pb2.GetTrainerStatusResponse:
        live = await asyncio.to_thread(self.registry.live)
        loop = self.role.loop
        leader = await self._leader_name()
        if loop is None:
            return trainer_pb2.GetTrainerStatusResponse(
                strategy=self.settings.strategy,
                live_version=live.version if live else "",
                role=trainer_pb2.TRAINER_ROLE_STANDBY,
                leader=leader,
            )
        learner = loop.learner
        p = learner.position
        figures = learner.prequential.as_metrics()
        figures.update(learner.served.as_metrics("served"))
        figures.update(
            {
                "items": float(len(learner.items)),
                "users": float(len(learner.users)),
                "replay_size": float(learner.replay.size),
                "skipped_steps": float(learner.skipped_steps),
            }
        )
        figures.update(loop.bootstrap_state)
        figures["bootstrapping"] = float(loop.bootstrapping)
        gate = learner.gate
        if gate.n:
            figures.update(
                {
                    "gate_events": float(gate.n),
                    "gate_learner_hr@10": gate.mean_a,
                    "gate_live_hr@10": gate.mean_b,
                }
            )
        response = trainer_pb2.GetTrainerStatusResponse(
            strategy=self.settings.strategy,
            live_version=live.version if live else "",
            events_learned=p.events_learned,
            watermark=watermark_proto(p.stream_sequence, p.event_time),
            metrics=figures,
            last_export_seconds=loop.last_export_seconds,
            role=trainer_pb2.TRAINER_ROLE_LEADER,
            leader=leader,
        )
        if loop.last_export_at:
            response.last_export_at.FromNanoseconds(int(loop.last_export_at * 1e9))
        return response

    async def TriggerTraining(
        self, request: trainer_pb2.TriggerTrainingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trainer_pb2.TriggerTrainingResponse:
        if request.kind not in (
            trainer_pb2.TRAINING_KIND_UNSPECIFIED,
            trainer_pb2.TRAINING_KIND_EXPORT,
            trainer_pb2.TRAINING_KIND_RETRAIN,
        ):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown training kind {request.kind}")
        loop = await self._leading_loop(context)
        if loop.learner.position.events_learned == 0:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the trainer has learned no events yet; ingest some first",
            )
        try:
            row = await loop.request(request.kind)
        except LostLease as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{exc}: send this to the new leader")
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"training failed: {exc}")
        return trainer_pb2.TriggerTrainingResponse(model=row.to_proto())

    async def ListModels(
        self, request: trainer_pb2.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trainer_pb2.ListModelsResponse:
        rows = await asyncio.to_thread(self.registry.newest_first, request.limit)
        live = next((r.version for r in rows if r.status == LIVE), "")
        if not live:
            row = await asyncio.to_thread(self.registry.live)
            live = row.version if row else ""
        return trainer_pb2.ListModelsResponse(models=[r.to_proto() for r in rows], live_version=live)

    async def PromoteModel(
        self, request: trainer_pb2.PromoteModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trainer_pb2.PromoteModelResponse:
        await self._check_version(request.version, context, required=True)
        row, previous = await self._make_live(request.version, "promoted", context)
        return trainer_pb2.PromoteModelResponse(model=row.to_proto(), previous_version=previous)

    async def RollbackModel(
        self, request: trainer_pb2.RollbackModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trainer_pb2.RollbackModelResponse:
        await self._check_version(request.version, context, required=False)
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

    async def _check_version(
        self, version: str, context: grpc.aio.ServicerContext[Any, Any], required: bool
    ) -> None:
        if required and not version:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "version is empty")
        if len(version) > MAX_VERSION_LENGTH or not version.isprintable():
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"version must be at most {MAX_VERSION_LENGTH} printable characters",
            )

    async def _make_live(
        self, version: str, reason: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[ModelRow, str]:
        if await asyncio.to_thread(self.registry.get, version) is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model version {version!r} is not in the registry"
            )
        loop = await self._leading_loop(context)
        try:
            return await loop.make_live(version, reason)
        except LostLease as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{exc}: send this to the new leader")
        except ArtifactError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot make {version} live: {exc}")
        raise AssertionError("unreachable")
