"""Ingest and storage apply one rule set: whatever ingest accepts, storage accepts."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import ValidationError

from services.ingest.settings import IngestSettings
from services.ingest.validation import BatchLimits, validate_batch
from services.storage.batch import Limits, batch_columns
from streammesh.api.common.v1 import event_pb2
from streammesh.envelope import EnvelopeLimits, envelope_columns, event_violations
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


MORE_CASES = {
    "valid": event_pb2.Event(id="a", key="k", type="t", payload=b"{}"),
    "no id": event_pb2.Event(key="k", type="t"),
    "no key": event_pb2.Event(id="a", type="t"),
    "no type": event_pb2.Event(id="a", key="k"),
    "id too long": event_pb2.Event(id="i" * 129, key="k", type="t"),
    "key too long": event_pb2.Event(id="a", key="k" * 257, type="t"),
    "payload too large": event_pb2.Event(id="a", key="k", type="t", payload=b"p" * (1 << 20 + 1)),
    "NUL in the id": event_pb2.Event(id="a\x00", key="k", type="t"),
    "NUL in the content type": event_pb2.Event(id="a", key="k", type="t", content_type="\x00"),
    "65 attributes": event_pb2.Event(
        id="a", key="k", type="t", attributes={f"a{i}": "v" for i in range(65)}
    ),
    "a valid event time": event_pb2.Event(
        id="a", key="k", type="t", event_time=Timestamp(seconds=1_700_000_000)
    ),
}


@pytest.mark.parametrize("require_id", [False, True], ids=["ingest", "storage"])
@pytest.mark.parametrize("name", [*EDGE_CASES, *MORE_CASES])
def test_the_column_check_agrees_with_the_event_check(name: str, require_id: bool) -> None:
    # envelope_columns is the fast path of both services: it may only accept a batch in which
    # event_violations finds nothing, and must accept every such batch.
    bad = EDGE_CASES.get(name) or MORE_CASES[name]
    good = event_pb2.Event(id="g", key="k", type="t")
    batch = [good, bad, good]
    exact = [
        v
        for event in batch
        for v in event_violations(event, EnvelopeLimits(), require_id=require_id)
    ]
    columns = envelope_columns(batch, EnvelopeLimits(), require_id=require_id)
    assert (columns is not None) == (not exact), f"{name}: fast path disagrees with {exact}"
    if columns is not None:
        assert columns.ids == [e.id for e in batch]
        assert columns.payloads == [e.payload for e in batch]


@pytest.mark.parametrize(
    ("when", "reason"),
    [
        (
            Timestamp(seconds=253_402_300_800),
            "outside 0001-01-01T00:00:00Z..9999-12-31T23:59:59.999999999Z",
        ),
        (Timestamp(seconds=-62_135_596_801, nanos=999_999_999), "outside 0001-01-01T00:00:00Z"),
        (Timestamp(seconds=0, nanos=-1), "nanos must be 0..999999999, got -1"),
    ],
)
def test_ingest_names_an_event_time_outside_the_range(when: Timestamp, reason: str) -> None:
    events = [event_pb2.Event(key="k", type="t") for _ in range(5)]
    events[3].event_time.CopyFrom(when)
    with pytest.raises(InvalidArgument) as caught:
        validate_batch(events, BatchLimits())
    [(field, message)] = caught.value.field_violations
    assert field == "events[3].event_time"
    assert message.startswith(reason)


def test_ingest_cannot_be_set_to_accept_a_payload_storage_refuses() -> None:
    # Storage applies the contract's payload limit whatever ingest was told: a larger ingest
    # limit would acknowledge events that storage dead-letters.
    limit = EnvelopeLimits().max_payload_bytes
    assert IngestSettings().max_payload_bytes == limit
    assert IngestSettings(max_payload_bytes=1024).max_payload_bytes == 1024
    with pytest.raises(ValidationError):
        IngestSettings(max_payload_bytes=limit + 1)
