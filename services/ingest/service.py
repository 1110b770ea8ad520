"""IngestServicer handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.ingest.queue import StreamAppender
from services.ingest.validation import BatchLimits, validate_batch
from streammesh.api.ingest.v1 import ingest_pb2, ingest_pb2_grpc

__all__ = ["IngestServicer"]


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, appender: StreamAppender, limits: BatchLimits) -> None:
        self._appender = appender
        self._limits = limits

    async def PublishBatch(
        self, request: ingest_pb2.PublishBatchRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.PublishBatchResponse:
        ids = validate_batch(request.events, self._limits)
        await self._appender.append(request.events, producer=request.producer)
        return ingest_pb2.PublishBatchResponse(accepted=len(ids), event_ids=ids)

    async def Publish(
        self,
        request_iterator: AsyncIterator[ingest_pb2.PublishRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ingest_pb2.PublishResponse]:
        # Batches are appended and acknowledged strictly in arrival order, so per-key order holds
        # across batches of one stream. A refused batch ends the stream with its status; every
        # batch acknowledged before it stays queued.
        async for request in request_iterator:
            ids = validate_batch(request.events, self._limits)
            await self._appender.append(request.events, producer=request.producer)
            yield ingest_pb2.PublishResponse(
                sequence=request.sequence, accepted=len(ids), event_ids=ids
            )
