"""Queue entries as the engine's events, decoded only as far as the engine reads them.

An entry's columns are parsed once (protobuf); each event becomes an `EngineEvent` whose payload
and attributes stay raw bytes until a window or rule reads them (`LazyPayload`), since most
events match no definition. Every event is given to the engine, matched or not: each one moves
its partition's watermark.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.message import DecodeError

from services.processor.engine.events import EngineEvent
from services.processor.engine.payload import LazyPayload
from streammesh.api.common.v1 import event_pb2
from streammesh.entries import Entry, entry_body, expand_runs, run_tenants
from streammesh.mesh.tenancy import DEFAULT_TENANT

__all__ = ["engine_events", "entry_tenants"]

_JSON_TYPES = frozenset(("", "application/json"))
_NO_ATTRIBUTES: Mapping[str, Any] = {}


def entry_tenants(fields: dict[bytes, bytes] | None) -> frozenset[str]:
    """The tenants whose events an entry holds (one per run; "default" for entries written
    before tenants). Asked only while some tenant has definitions; an entry that does not
    decode holds none the engine could read."""
    try:
        body = entry_body(fields)
        if body.columnar:
            return frozenset(run_tenants(event_pb2.QueuedColumns.FromString(body.data)))
        return frozenset((body.batch().tenant or DEFAULT_TENANT,))
    except DecodeError:
        return frozenset()


def engine_events(entries: list[Entry], partition: int) -> list[EngineEvent]:
    """The events of the entries, in stream order. An entry that does not decode gives none
    (storage stored it, so it decodes; a dead letter never reaches the engine)."""
    events: list[EngineEvent] = []
    for _, fields in entries:
        try:
            body = entry_body(fields)
            if body.columnar:
                _from_columns(body.data, partition, events)
            else:
                _from_batch(body.batch(), partition, events)
        except (DecodeError, ValueError):  # malformed columns (lists of different lengths)
            continue
    return events


def _from_columns(data: bytes, partition: int, events: list[EngineEvent]) -> None:
    columns = event_pb2.QueuedColumns.FromString(data)
    tenants = expand_runs(run_tenants(columns), columns.run_lengths)
    append = events.append
    for event_id, key, kind, payload, content_type, attributes, micros, nanos, tenant in zip(
        columns.ids,
        columns.keys,
        columns.types,
        columns.payloads,
        columns.content_types,
        columns.attributes,
        columns.event_time_micros,
        columns.event_time_nanos,
        tenants,
        strict=True,
    ):
        append(
            EngineEvent(
                event_id,
                key,
                kind,
                micros * 1000 + nanos,
                partition,
                tenant,
                LazyPayload(payload if content_type in _JSON_TYPES else b""),
                _NO_ATTRIBUTES if attributes in ("", "{}") else LazyPayload(attributes.encode()),
            )
        )


def _from_batch(batch: event_pb2.QueuedBatch, partition: int, events: list[EngineEvent]) -> None:
    tenant = batch.tenant or DEFAULT_TENANT
    for queued in batch.events:
        event = queued.event
        stamp = event.event_time if event.HasField("event_time") else queued.ingest_time
        events.append(
            EngineEvent(
                event.id,
                event.key,
                event.type,
                stamp.seconds * 1_000_000_000 + stamp.nanos,
                partition,
                tenant,
                LazyPayload(event.payload if event.content_type in _JSON_TYPES else b""),
                dict(event.attributes),
            )
        )
