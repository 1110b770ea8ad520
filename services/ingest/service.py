"""IngestServicer handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from services.ingest.idempotency import CONFLICT, CONFLICT_REASON, DUPLICATE
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


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A batch's acknowledgement: every id, how many were accepted (duplicates included), the
    refused events and the duplicates (indexes)."""

    ids: list[str]
    accepted: int
    refused: list[event_pb2.EventRefusal]
    duplicates: list[int]


def _conflict(index: int, event_id: str) -> event_pb2.EventRefusal:
    return event_pb2.EventRefusal(
        index=index,
        event_id=event_id,
        reason=CONFLICT_REASON,
        message=(
            "this id was published before with other content (key, type, content type, "
            "payload, attributes or event time); the first event is kept: publish a new event "
            "under a new id"
        ),
    )


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
        self,
        events: Sequence[event_pb2.Event],
        *,
        producer: str,
        tenant: str,
        replay: bool = False,
    ) -> _Outcome:
        """Validate the batch (refused whole on an envelope violation), check payloads (refused
        per event), append the rest, less what the idempotency window holds (duplicates are
        accepted, conflicts refused) unless it is a dead-letter `replay`."""
        columns = validate_batch(events, self._limits, producer=producer)
        refused = (
            [] if self._schemas is None else await refused_events(events, tenant, self._schemas)
        )
        positions: Sequence[int] = range(len(events))  # in the batch, of each appended event
        try:
            if not refused:
                seen = await self._appender.append(
                    events, columns, producer=producer, tenant=tenant, guarded=not replay
                )
            else:
                # The kept events' columns are read again: refusals are the rare path.
                out = {refusal.index for refusal in refused}
                positions = [index for index in range(len(events)) if index not in out]
                kept = [events[index] for index in positions]
                seen = (
                    await self._appender.append(
                        kept, producer=producer, tenant=tenant, guarded=not replay
                    )
                    if kept
                    else {}
                )
        except ResourceExhausted:  # only back-pressure refuses a valid batch so
            self._metrics.backpressure_refusals.inc()
            raise
        duplicates = sorted(positions[i] for i, verdict in seen.items() if verdict == DUPLICATE)
        conflicts = sorted(positions[i] for i, verdict in seen.items() if verdict == CONFLICT)
        if conflicts:
            refused = sorted(
                [*refused, *(_conflict(index, columns.ids[index]) for index in conflicts)],
                key=lambda refusal: refusal.index,
            )
        accepted = len(positions) - len(conflicts)
        self._metrics.events_accepted.inc(accepted)
        if refused:
            self._metrics.events_refused.inc(len(refused))
        return _Outcome(columns.ids, accepted, refused, duplicates)

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The tenant the gateway names for the caller (x-streammesh-tenant); DEFAULT_TENANT
        for a call that names none (an operator's own tools)."""
        return caller_tenant(context, trust_domain=self._trust_domain) or DEFAULT_TENANT

    async def PublishBatch(
        self, request: ingest_pb2.PublishBatchRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.PublishBatchResponse:
        outcome = await self._accept(
            request.events,
            producer=request.producer,
            tenant=self._tenant(context),
            replay=request.replay,
        )
        return ingest_pb2.PublishBatchResponse(
            accepted=outcome.accepted,
            event_ids=outcome.ids,
            refused=outcome.refused,
            duplicates=outcome.duplicates,
        )

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
                outcome = await self._accept(
                    request.events, producer=request.producer, tenant=tenant
                )
            except StreamMeshError as refusal:
                yield ingest_pb2.PublishResponse(refusal=publish_refusal(request.sequence, refusal))
                await drain_until_half_close(request_iterator, REFUSAL_LINGER_SECONDS)
                raise
            yield ingest_pb2.PublishResponse(
                sequence=request.sequence,
                accepted=outcome.accepted,
                event_ids=outcome.ids,
                refused=outcome.refused,
                duplicates=outcome.duplicates,
            )
