"""The processor's view of storage: one mesh client (`storage_client`) for StorageService and
DefinitionService, and StoreEvents and StoreDeadLetter over it (both idempotent in the protos,
so the mesh client retries them), with failures sorted for the worker: outages
(`StoreUnavailable`, wait), permanent refusals (`PermanentStoreError`, dead-letter now), and the
rest (counted retries)."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from services.processor.delivery.dead_letters import DeadLetterRecord, StoreUnavailable, is_outage
from services.processor.delivery.store import PermanentStoreError, StaleLeaseEpoch, StoreResult
from streammesh.api.storage.v1 import definitions_pb2, storage_pb2, storage_pb2_grpc
from streammesh.entries import QueuedBody
from streammesh.mesh.client import (
    DEFAULT_TLS_RELOAD_SECONDS,
    MeshClient,
    MeshClientConfig,
    TlsFiles,
    parse_targets,
)
from streammesh.mesh.errors import STATUS_DETAILS_KEY
from streammesh.refusals import error_reasons
from streammesh.wire import length_delimited_field

__all__ = [
    "StorageWriter",
    "classify",
    "dead_letter_request",
    "storage_client",
    "store_events_request",
]

STORAGE_SERVICE = "streammesh.storage.v1.StorageService"


def storage_client(
    target: str,
    tls_dir: Path,
    *,
    timeout_seconds: float,
    tls_reload_seconds: float | None = DEFAULT_TLS_RELOAD_SECONDS,
) -> MeshClient:
    """The processor's one client to storage (every replica in `target`), for StoreEvents,
    StoreDeadLetter and the engine's and definition follower's DefinitionService calls; what
    is retried comes from the protos (all of these are idempotent)."""
    return MeshClient(
        MeshClientConfig(
            server_name="storage",
            targets=parse_targets(target),
            tls=TlsFiles.of(tls_dir, "processor"),
            services=(
                storage_pb2.DESCRIPTOR.services_by_name["StorageService"],
                definitions_pb2.DESCRIPTOR.services_by_name["DefinitionService"],
            ),
            timeout_seconds=timeout_seconds,
            tls_reload_seconds=tls_reload_seconds,
        )
    )


# A batch storage refuses for these reasons will be refused again: dead-letter it.
_PERMANENT = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}


STALE_LEASE_EPOCH = "STALE_LEASE_EPOCH"
"""ErrorInfo reason of a store storage refused for a stale lease epoch (services/storage/
event_fences.py; the processor may not import storage, so the name is repeated here)."""
_STORED_EPOCH = re.compile(r"stored epoch (\d+)")


def _reasons(error: grpc.aio.AioRpcError) -> set[str]:
    reasons: set[str] = set()
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            reasons |= error_reasons(value)
    return reasons


def classify(error: grpc.aio.AioRpcError) -> Exception | None:
    """The exception the worker acts on for a failed StoreEvents call; None when the error
    itself is it (INTERNAL, RESOURCE_EXHAUSTED, UNKNOWN, ...: it counts toward the limit)."""
    text = f"{error.code().name}: {error.details()}"
    if is_outage(error):
        return StoreUnavailable(text)
    if error.code() == grpc.StatusCode.FAILED_PRECONDITION and STALE_LEASE_EPOCH in _reasons(error):
        found = _STORED_EPOCH.search(error.details() or "")
        return StaleLeaseEpoch(text, int(found.group(1)) if found else 0)
    if error.code() in _PERMANENT:
        return PermanentStoreError(text)
    return None


_COLUMNS_FIELD_NUMBER = storage_pb2.StoreEventsRequest.COLUMNS_FIELD_NUMBER
_BATCH_FIELD_NUMBER = storage_pb2.StoreEventsRequest.BATCH_FIELD_NUMBER
_FENCES_FIELD_NUMBER = storage_pb2.StoreEventsRequest.FENCES_FIELD_NUMBER


def store_events_request(body: QueuedBody) -> bytes:
    """A serialized StoreEventsRequest around an entry's serialized events: `columns` or `batch`
    as the entry holds them, framed around the bytes as they are, then the body's fences."""
    number = _COLUMNS_FIELD_NUMBER if body.columnar else _BATCH_FIELD_NUMBER
    framed = length_delimited_field(number, body.data)
    for stream, partition, epoch in body.fences:
        fence = definitions_pb2.PartitionFence(
            stream=stream, partition=partition, lease_epoch=epoch
        ).SerializeToString()
        framed += length_delimited_field(_FENCES_FIELD_NUMBER, fence)
    return framed


def dead_letter_request(record: DeadLetterRecord) -> storage_pb2.StoreDeadLetterRequest:
    request = storage_pb2.StoreDeadLetterRequest(
        stream=record.stream,
        partition=record.partition,
        entry_id=record.entry_id,
        batch=record.batch or b"",
        raw_fields=[storage_pb2.RawField(name=n, value=v) for n, v in record.raw_fields],
        event_ids=record.event_ids,
        error=record.error,
        delivery_count=record.delivery_count,
    )
    request.first_failed_at.FromDatetime(record.first_failed_at)
    request.last_failed_at.FromDatetime(record.last_failed_at)
    return request


class StorageWriter:
    """StoreEvents and StoreDeadLetter over a `storage_client` (which its owner closes)."""

    def __init__(self, client: MeshClient) -> None:
        self._stub = client.stub(storage_pb2_grpc.StorageServiceStub)
        # StoreEvents taking the request already serialized: see store_events_request.
        self._store_events = client.channel.unary_unary(
            f"/{STORAGE_SERVICE}/StoreEvents",
            request_serializer=None,
            response_deserializer=storage_pb2.StoreEventsResponse.FromString,
        )

    async def store(self, batch: QueuedBody) -> StoreResult:
        """Store an entry's events (passed on without decoding them)."""
        try:
            reply = await self._store_events(store_events_request(batch))
        except grpc.aio.AioRpcError as error:
            classified = classify(error)
            if classified is None:
                raise
            raise classified from error
        return StoreResult(inserted=reply.inserted, duplicates=reply.duplicates)

    async def record_dead_letter(self, record: DeadLetterRecord) -> int:
        """Store the record (idempotent); returns its dead-letter id. Outages raise
        StoreUnavailable; any other refusal raises the AioRpcError."""
        try:
            reply = await self._stub.StoreDeadLetter(dead_letter_request(record))
        except grpc.aio.AioRpcError as error:
            if is_outage(error):
                raise StoreUnavailable(f"{error.code().name}: {error.details()}") from error
            raise
        return int(reply.dead_letter.id)
