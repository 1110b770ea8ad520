"""The engine's view of queue entries: each event carries the tenant of its run, and an
entry's tenants are read from its runs (both queue forms)."""

from __future__ import annotations

from services.processor.processing.decode import engine_events, entry_tenants
from streammesh.api.common.v1 import event_pb2
from streammesh.streams import BATCH_FIELD, COLUMNS_FIELD


def _columns(run_tenants: list[str]) -> event_pb2.QueuedColumns:
    return event_pb2.QueuedColumns(
        ids=["a", "b", "c"],
        keys=["k", "k", "k"],
        types=["t", "t", "t"],
        payloads=[b"{}", b"{}", b"{}"],
        content_types=["", "", ""],
        attributes=["{}", "{}", "{}"],
        event_time_micros=[1, 2, 3],
        event_time_nanos=[0, 0, 0],
        ingest_time_micros=[5, 6],
        producers=["p", "q"],
        run_lengths=[2, 1],
        run_tenants=run_tenants,
    )


def test_events_carry_the_tenant_of_their_run() -> None:
    entry = (b"1-0", {COLUMNS_FIELD: _columns(["acme", "globex"]).SerializeToString()})
    events = engine_events([entry], partition=3)
    assert [(e.id, e.tenant) for e in events] == [("a", "acme"), ("b", "acme"), ("c", "globex")]
    assert entry_tenants(entry[1]) == {"acme", "globex"}


def test_entries_written_before_tenants_are_the_default_tenants() -> None:
    entry = (b"1-0", {COLUMNS_FIELD: _columns([]).SerializeToString()})
    assert {e.tenant for e in engine_events([entry], partition=0)} == {"default"}
    assert entry_tenants(entry[1]) == {"default"}
    batch = event_pb2.QueuedBatch(
        events=[event_pb2.QueuedEvent(event=event_pb2.Event(id="x", key="k", type="t"))],
        tenant="acme",
    )
    fields = {BATCH_FIELD: batch.SerializeToString()}
    assert [e.tenant for e in engine_events([(b"2-0", fields)], partition=0)] == ["acme"]
    assert entry_tenants(fields) == {"acme"}


def test_an_entry_that_does_not_decode_gives_nothing() -> None:
    fields = {COLUMNS_FIELD: b"\xff\xff"}
    assert engine_events([(b"1-0", fields)], partition=0) == []
    assert entry_tenants(fields) == frozenset()
    assert entry_tenants({}) == frozenset()
