"""The gRPC face of ingestion: ``freshrec.v1.IngestionService``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from freshrec.v1 import event_pb2, ingestion_pb2, ingestion_pb2_grpc
from services.ingestion.ingestor import Ingestor


class IngestionServicer(ingestion_pb2_grpc.IngestionServiceServicer):
    def __init__(self, ingestor: Ingestor, max_batch: int) -> None:
        self.ingestor = ingestor
        self.max_batch = max_batch

    async def IngestEvents(
        self, request: ingestion_pb2.IngestEventsRequest, context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.IngestEventsResponse:
        if len(request.events) > self.max_batch:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"batch of {len(request.events)} events exceeds the limit of {self.max_batch}; split it",
            )
        summary = await self.ingestor.ingest(list(request.events))
        return ingestion_pb2.IngestEventsResponse(
            accepted=summary.accepted, duplicates=summary.duplicates, errors=summary.errors
        )

    async def IngestEventStream(
        self, request_iterator: AsyncIterator[event_pb2.Event], context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.IngestEventStreamResponse:
        response = ingestion_pb2.IngestEventStreamResponse()
        batch: list[event_pb2.Event] = []
        index = 0

        async def flush() -> None:
            nonlocal index
            summary = await self.ingestor.ingest(batch, first_index=index)
            response.accepted += summary.accepted
            response.duplicates += summary.duplicates
            response.errors.extend(summary.errors)
            index += len(batch)
            batch.clear()

        async for event in request_iterator:
            batch.append(event)
            if len(batch) >= self.max_batch:
                await flush()
        if batch:
            await flush()
        return response
