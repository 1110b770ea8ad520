"""Ingest and storage apply one rule set: whatever ingest accepts, storage accepts."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.ingest.validation import BatchLimits, validate_batch
from services.storage.batch import Limits, batch_columns
from streammesh.api.common.v1 import event_pb2
from streammesh.mesh.errors import InvalidArgument

EDGE_CASES = {
    "at every limit": event_pb2.Event(
        id="i" * 128, key="k" * 256, type="t" * 128, content_type="c" * 128, payload=b"p" * 1024
    ),
    "content_type too long": event_pb2.Event(key="k", type="t", content_type="c" * 129),
    "nanos out of range": event_pb2.Event(
        key="k", type="t", event_time=Timestamp(seconds=1, nanos=1_000_000_000)
    ),
    "year 10000": event_pb2.Event(key="k", type="t", event_time=Timestamp(seconds=253_402_300_800)),
    "NUL in an attribute": event_pb2.Event(key="k", type="t", attributes={"a": "b\x00"}),
    "NUL in the type": event_pb2.Event(key="k", type="t\x00"),
    "unicode everywhere": event_pb2.Event(
        key="ключ-🔑", type="заказ.создан", attributes={"ü": "ß"}
    ),
    "year 1": event_pb2.Event(key="k", type="t", event_time=Timestamp(seconds=-62_135_596_800)),
}


def _storage_accepts(event: event_pb2.Event) -> bool:
    queued = event_pb2.QueuedEvent(event=event, producer="p", ingest_time=Timestamp(seconds=1))
    try:
        batch_columns(event_pb2.QueuedBatch(events=[queued]), Limits())
    except InvalidArgument:
        return False
    return True


@pytest.mark.parametrize("name", EDGE_CASES)
def test_ingest_acceptance_implies_storage_acceptance(name: str) -> None:
    event = event_pb2.Event()
    event.CopyFrom(EDGE_CASES[name])
    try:
        validate_batch([event], BatchLimits())
    except InvalidArgument:
        return  # refused at the edge: never acknowledged
    assert _storage_accepts(event), f"ingest acknowledged what storage refuses: {name}"


@pytest.mark.parametrize("name", ["at every limit", "unicode everywhere", "year 1"])
def test_boundary_events_pass_both(name: str) -> None:
    event = event_pb2.Event()
    event.CopyFrom(EDGE_CASES[name])
    validate_batch([event], BatchLimits())
    assert _storage_accepts(event)
