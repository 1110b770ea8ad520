"""StoreEvents with `columns.run_partitions`: the entries of several partitions in one call and
one INSERT, as a processor sends a round's small groups (each entry's bytes followed by its
partition, concatenated undecoded), over real mTLS and a real Postgres schema."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.store import BatchColumns, EventStore
from services.storage.times import use_integer_timestamps
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh.postgres import create_pool
from streammesh.wire import varint_field
from tests.storage.conftest import Stub, as_columns, queued

_RUN_PARTITIONS = event_pb2.QueuedColumns.RUN_PARTITIONS_FIELD_NUMBER


def entry(partition: int, events: list[event_pb2.QueuedEvent]) -> bytes:
    """An entry as ingest writes it (one run: the events share ingest time and producer),
    followed by its partition as the processor appends it."""
    columns = as_columns(event_pb2.QueuedBatch(events=events, partition=partition))
    del columns.ingest_time_micros[1:], columns.producers[1:]
    columns.run_lengths[:] = [len(events)]
    return columns.SerializeToString() + varint_field(_RUN_PARTITIONS, partition)


def several(*entries: tuple[int, list[event_pb2.QueuedEvent]]) -> storage_pb2.StoreEventsRequest:
    merged = event_pb2.QueuedColumns.FromString(b"".join(entry(p, e) for p, e in entries))
    return storage_pb2.StoreEventsRequest(columns=merged)


async def stored_partitions(engine: AsyncEngine) -> list[tuple[str, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT id, partition FROM events ORDER BY seq"))
        return [(row[0], row[1]) for row in rows]


async def test_entries_of_several_partitions_are_stored_in_order_with_their_partition(
    processor: Stub, engine: AsyncEngine
) -> None:
    request = several(
        (0, [queued("a", event_id="a1"), queued("a", event_id="a2")]),
        (5, [queued("b", event_id="b1")]),
        (7, [queued("c", event_id="c1"), queued("a", event_id="a1")]),  # a1 again: a duplicate
    )
    assert list(request.columns.run_partitions) == [0, 5, 7]
    reply = await processor.StoreEvents(request, timeout=5)
    assert (reply.inserted, reply.duplicates) == (4, 1)
    assert await stored_partitions(engine) == [("a1", 0), ("a2", 0), ("b1", 5), ("c1", 7)]
    again = await processor.StoreEvents(request, timeout=5)
    assert (again.inserted, again.duplicates) == (0, 5)


async def test_partition_is_ignored_beside_run_partitions_and_refused_without(
    processor: Stub, engine: AsyncEngine
) -> None:
    """A processor sets `partition` beyond the column in a request across partitions: this
    storage ignores it, one that predates run_partitions refuses the request (as this one does
    without run_partitions) instead of filing every row under one partition."""
    request = several((1, [queued(event_id="p1")]), (2, [queued(event_id="p2")]))
    request.columns.partition = 2**32 - 1
    older = storage_pb2.StoreEventsRequest()
    older.CopyFrom(request)
    del older.columns.run_partitions[:]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await processor.StoreEvents(older, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = await processor.StoreEvents(request, timeout=5)
    assert (reply.inserted, reply.duplicates) == (2, 0)
    assert await stored_partitions(engine) == [("p1", 1), ("p2", 2)]


async def test_run_partitions_must_hold_one_partition_per_run(
    processor: Stub, engine: AsyncEngine
) -> None:
    request = several((1, [queued(event_id="x1")]), (2, [queued(event_id="x2")]))
    request.columns.run_partitions.append(3)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await processor.StoreEvents(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "columns.run_partitions" in (caught.value.details() or "")
    assert await stored_partitions(engine) == []


async def test_a_partition_beyond_the_column_is_refused(
    processor: Stub, engine: AsyncEngine
) -> None:
    request = several((1, [queued(event_id="y1")]), (2**31, [queued(event_id="y2")]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await processor.StoreEvents(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "columns.run_partitions" in (caught.value.details() or "")
    assert await stored_partitions(engine) == []


async def test_a_bad_event_of_a_later_partition_stores_nothing(
    processor: Stub, engine: AsyncEngine
) -> None:
    request = several((1, [queued(event_id="good")]), (2, [queued(event_id="")]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await processor.StoreEvents(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await stored_partitions(engine) == []


async def test_rows_whose_texts_cannot_be_joined_take_the_array_statement(
    database_url: str, pg_schema: str, server: object, engine: AsyncEngine
) -> None:
    """One row cannot be joined (texts_joinable), so INSERT_PARTITIONS binds arrays."""
    pool = await create_pool(
        database_url, schema=pg_schema, application_name="t", size=1, init=use_integer_timestamps
    )
    try:
        store = EventStore(pool)
        columns = BatchColumns.empty()
        columns.append(
            id="solo",
            key="k",
            type="t",
            event_time=(0, 0),
            payload=b"{}",
            content_type="application/json",
            attributes="{}",
            ingest_time=0,
            producer="p",
            tenant="default",
        )
        assert await store.insert_partitions(columns, partitions=[9]) == 1
        assert await store.insert_partitions(columns, partitions=[9]) == 0
    finally:
        await pool.close()
    assert await stored_partitions(engine) == [("solo", 9)]
