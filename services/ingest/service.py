"""IngestServicer handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc

from services.ingest.payload_check import refused_events
from services.ingest.queue import StreamAppender
from services.ingest.schema_cache import SchemaCache
from services.ingest.validation import BatchLimits, validate_batch
from streammesh.api.common.v1 import event_pb2
from streammesh.api.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from streammesh.mesh.errors import ResourceExhausted, StreamMeshError
from streammesh.mesh.metrics.pipeline import IngestMetrics
from streammesh.mesh.tenancy import DEFAULT_TENANT, caller_tenant
from streammesh.refusals import (
    REFUSAL_LINGER_SECONDS,
    drain_until_half_close,
    publish_refusal,
)

__all__ = ["IngestServicer"]


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(
        self,
        appender: StreamAppender,
        limits: BatchLimits,
        schemas: SchemaCache | None = None,
        *,
        trust_domain: str,
        metrics: IngestMetrics | None = None,
    ) -> None:
        self._appender = appender
        self._metrics = metrics or IngestMetrics()
        self._limits = limits
        self._trust_domain = trust_domain
        self._schemas = schemas
        """None: payloads are not checked against registered schemas."""

    async def _accept(
        self, events: Sequence[event_pb2.Event], *, producer: str, tenant: str
    ) -> tuple[list[str], int, list[event_pb2.EventRefusal]]:
        """Validate the batch (refused whole on an envelope violation), check payloads (refused
        per event), append the rest; the ids of every event, how many were appended, and the
        refused ones."""
        columns = validate_batch(events, self._limits, producer=producer)
        refused = (
            [] if self._schemas is None else await refused_events(events, tenant, self._schemas)
        )
        try:
            if not refused:
                await self._appender.append(events, columns, producer=producer)
                self._metrics.events_accepted.inc(len(columns.ids))
                return columns.ids, len(columns.ids), []
            # The kept events' columns are read again: refusals are the rare path.
            self._metrics.events_refused.inc(len(refused))
            out = {refusal.index for refusal in refused}
            kept = [event for index, event in enumerate(events) if index not in out]
            if kept:
                await self._appender.append(kept, producer=producer)
                self._metrics.events_accepted.inc(len(kept))
            return columns.ids, len(kept), refused
        except ResourceExhausted:  # only back-pressure refuses a valid batch so
            self._metrics.backpressure_refusals.inc()
            raise

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The tenant the gateway names for the caller (x-streammesh-tenant); DEFAULT_TENANT
        for a call that names none (an operator's own tools)."""
        return caller_tenant(context, trust_domain=self._trust_domain) or DEFAULT_TENANT

    async def PublishBatch(
        self, request: ingest_pb2.PublishBatchRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.PublishBatchResponse:
        ids, accepted, refused = await self._accept(
            request.events, producer=request.producer, tenant=self._tenant(context)
        )
        return ingest_pb2.PublishBatchResponse(accepted=accepted, event_ids=ids, refused=refused)

    async def Publish(
        self,
        request_iterator: AsyncIterator[ingest_pb2.PublishRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ingest_pb2.PublishResponse]:
        # Batches are appended and acknowledged strictly in arrival order, so per-key order holds
        # across batches of one stream. A refused batch is answered with its status in the
        # message (`refusal`), then the stream ends with that status; every batch acknowledged
        # before it stays queued.
        tenant = self._tenant(context)
        async for request in request_iterator:
            try:
                ids, accepted, refused = await self._accept(
                    request.events, producer=request.producer, tenant=tenant
                )
            except StreamMeshError as refusal:
                yield ingest_pb2.PublishResponse(refusal=publish_refusal(request.sequence, refusal))
                await drain_until_half_close(request_iterator, REFUSAL_LINGER_SECONDS)
                raise
            yield ingest_pb2.PublishResponse(
                sequence=request.sequence, accepted=accepted, event_ids=ids, refused=refused
            )
