"""The gRPC face of ingestion: ``freshrec.v1.IngestionService``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from freshrec.v1 import event_pb2, ingestion_pb2, ingestion_pb2_grpc
from services.ingestion import metrics
from services.ingestion.forget import ForgetDesk
from services.ingestion.ingestor import Ingestor, Summary
from shared.validation import answers

logger = logging.getLogger(__name__)


class IngestionServicer(ingestion_pb2_grpc.IngestionServiceServicer):
    def __init__(self, ingestor: Ingestor, max_batch: int, desk: ForgetDesk) -> None:
        self.ingestor = ingestor
        self.max_batch = max_batch
        self.desk = desk

    @answers
    async def ForgetUser(
        self, request: ingestion_pb2.ForgetUserRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingestion_pb2.ForgetUserResponse:
        return await self.desk.forget(request.user_id)

    @answers
    async def GetForgetStatus(
        self, request: ingestion_pb2.GetForgetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingestion_pb2.GetForgetStatusResponse:
        return await self.desk.status(request.request_id)

    async def _ingest(
        self, events: list[event_pb2.Event], context: grpc.aio.ServicerContext[Any, Any], first_index: int = 0
    ) -> Summary:
        try:
            return await self.ingestor.ingest(events, "grpc", first_index=first_index)
        except Exception:
            # The event log could not commit (database unreachable, disk full): nothing was accepted.
            logger.exception("ingesting %d events failed", len(events))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the event log is unavailable; retry the batch")
            raise  # unreachable: abort raises

    async def IngestEvents(
        self, request: ingestion_pb2.IngestEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingestion_pb2.IngestEventsResponse:
        if len(request.events) > self.max_batch:
            metrics.BATCHES_REFUSED.labels("grpc").inc()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"batch of {len(request.events)} events exceeds the limit of {self.max_batch}; split it",
            )
        summary = await self._ingest(list(request.events), context)
        return ingestion_pb2.IngestEventsResponse(
            accepted=summary.accepted,
            duplicates=summary.duplicates,
            errors=summary.errors,
            forgotten=summary.forgotten,
        )

    async def IngestEventStream(
        self, request_iterator: AsyncIterator[event_pb2.Event], context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingestion_pb2.IngestEventStreamResponse:
        """Ingests the stream in chunks of ``max_batch``; indexes in errors count from the stream's start."""
        response = ingestion_pb2.IngestEventStreamResponse()
        batch: list[event_pb2.Event] = []
        index = 0

        async def flush() -> None:
            nonlocal index
            summary = await self._ingest(batch, context, first_index=index)
            response.accepted += summary.accepted
            response.duplicates += summary.duplicates
            response.errors.extend(summary.errors)
            response.forgotten += summary.forgotten
            index += len(batch)
            batch.clear()

        async for event in request_iterator:
            batch.append(event)
            if len(batch) >= self.max_batch:
                await flush()
        if batch:
            await flush()
        return response
