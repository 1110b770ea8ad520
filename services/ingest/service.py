"""IngestServicer handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.ingest.queue import StreamAppender
from services.ingest.validation import BatchLimits, validate_batch
from streammesh.api.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from streammesh.mesh.errors import StreamMeshError
from streammesh.refusals import (
    REFUSAL_LINGER_SECONDS,
    drain_until_half_close,
    publish_refusal,
)

__all__ = ["IngestServicer"]


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, appender: StreamAppender, limits: BatchLimits) -> None:
        self._appender = appender
        self._limits = limits

    async def PublishBatch(
        self, request: ingest_pb2.PublishBatchRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.PublishBatchResponse:
        columns = validate_batch(request.events, self._limits)
        await self._appender.append(request.events, columns, producer=request.producer)
        return ingest_pb2.PublishBatchResponse(accepted=len(columns.ids), event_ids=columns.ids)

    async def Publish(
        self,
        request_iterator: AsyncIterator[ingest_pb2.PublishRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ingest_pb2.PublishResponse]:
        # Batches are appended and acknowledged strictly in arrival order, so per-key order holds
        # across batches of one stream. A refused batch is answered with its status in the
        # message (`refusal`), then the stream ends with that status; every batch acknowledged
        # before it stays queued.
        async for request in request_iterator:
            try:
                columns = validate_batch(request.events, self._limits)
                await self._appender.append(request.events, columns, producer=request.producer)
            except StreamMeshError as refusal:
                yield ingest_pb2.PublishResponse(refusal=publish_refusal(request.sequence, refusal))
                await drain_until_half_close(request_iterator, REFUSAL_LINGER_SECONDS)
                raise
            yield ingest_pb2.PublishResponse(
                sequence=request.sequence, accepted=len(columns.ids), event_ids=columns.ids
            )
