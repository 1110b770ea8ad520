"""StorageService over real mTLS and a real Postgres schema: idempotent batches, order, paging,
filters, validation and the peer policy."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.sql import TEXT_SEPARATOR, texts_joinable
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh import MeshServer
from tests.storage.conftest import BASE_TIME, Connect, StartServer, Stub, as_columns, queued


def store_request(
    events: list[event_pb2.QueuedEvent], partition: int = 3
) -> storage_pb2.StoreEventsRequest:
    return storage_pb2.StoreEventsRequest(
        batch=event_pb2.QueuedBatch(events=events, partition=partition)
    )


async def query_all(
    stub: Stub, event_filter: event_pb2.EventFilter | None = None, page_size: int = 1000
) -> list[event_pb2.StoredEvent]:
    """Every page of a query, checking that only the last page lacks a token."""
    found: list[event_pb2.StoredEvent] = []
    token = ""
    while True:
        page = await stub.QueryEvents(
            storage_pb2.QueryEventsRequest(
                filter=event_filter, page_size=page_size, page_token=token
            ),
            timeout=5,
        )
        found.extend(page.events)
        if not page.next_page_token:
            return found
        assert page.events, "a page with a next token must not be empty"
        token = page.next_page_token


async def count(stub: Stub, event_filter: event_pb2.EventFilter | None = None) -> int:
    reply = await stub.CountEvents(storage_pb2.CountEventsRequest(filter=event_filter), timeout=5)
    return int(reply.count)


def field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return [violation.field for violation in bad_request.field_violations]


async def rows_in_table(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM events"))).scalar_one())


async def test_redelivered_batch_is_stored_once(
    processor: Stub, gateway: Stub, engine: AsyncEngine
) -> None:
    batch = [queued(f"k{i % 4}") for i in range(50)]
    first = await processor.StoreEvents(store_request(batch), timeout=5)
    assert (first.inserted, first.duplicates) == (50, 0)
    again = await processor.StoreEvents(store_request(batch), timeout=5)
    assert (again.inserted, again.duplicates) == (0, 50)
    assert await rows_in_table(engine) == 50
    assert await count(gateway) == 50


async def test_partly_new_batch_and_repeats_inside_a_batch(
    processor: Stub, engine: AsyncEngine
) -> None:
    old = [queued() for _ in range(5)]
    await processor.StoreEvents(store_request(old), timeout=5)
    fresh = queued()
    mixed = [*old[:3], fresh, fresh]
    reply = await processor.StoreEvents(store_request(mixed), timeout=5)
    assert (reply.inserted, reply.duplicates) == (1, 4)
    assert await rows_in_table(engine) == 6


async def test_sequence_follows_batch_order_per_key(processor: Stub, gateway: Stub) -> None:
    # Ids deliberately out of lexical order, so only batch order can explain the result.
    batch = [queued(f"key-{i % 3}", event_id=f"{(i * 7919) % 101:03d}-{i}") for i in range(90)]
    await processor.StoreEvents(store_request(batch), timeout=5)
    stored = await query_all(gateway)
    assert [s.event.id for s in stored] == [q.event.id for q in batch]
    sequences = [s.sequence for s in stored]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    for key in ("key-0", "key-1", "key-2"):
        ids_by_seq = [s.event.id for s in stored if s.event.key == key]
        assert ids_by_seq == [q.event.id for q in batch if q.event.key == key]


async def test_pagination_returns_every_event_once_in_order(processor: Stub, gateway: Stub) -> None:
    batch = [queued(f"k{i % 5}") for i in range(250)]
    await processor.StoreEvents(store_request(batch), timeout=5)
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await gateway.QueryEvents(
            storage_pb2.QueryEventsRequest(page_size=100, page_token=token), timeout=5
        )
        pages.append([s.event.id for s in page.events])
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [100, 100, 50]
    assert [event_id for page in pages for event_id in page] == [q.event.id for q in batch]


async def test_default_page_size_is_100(processor: Stub, gateway: Stub) -> None:
    await processor.StoreEvents(store_request([queued() for _ in range(101)]), timeout=5)
    page = await gateway.QueryEvents(storage_pb2.QueryEventsRequest(), timeout=5)
    assert len(page.events) == 100 and page.next_page_token


async def test_filters_and_count_agree(processor: Stub, gateway: Stub) -> None:
    batch = [
        queued(
            f"k{i % 3}",
            type_="order.created" if i % 2 else "order.paid",
            event_time=BASE_TIME + dt.timedelta(minutes=i),
        )
        for i in range(60)
    ]
    await processor.StoreEvents(store_request(batch), timeout=5)
    start, end = BASE_TIME + dt.timedelta(minutes=10), BASE_TIME + dt.timedelta(minutes=40)
    time_filter = event_pb2.EventFilter()
    time_filter.start_time.FromDatetime(start)
    time_filter.end_time.FromDatetime(end)
    everything = event_pb2.EventFilter(
        keys=["k0", "k2"], type="order.paid", start_time=time_filter.start_time,
        end_time=time_filter.end_time,
    )  # fmt: skip
    cases: dict[str, tuple[event_pb2.EventFilter, Callable[[int], bool]]] = {
        "keys": (event_pb2.EventFilter(keys=["k1", "k2", "nope"]), lambda i: i % 3 != 0),
        "type": (event_pb2.EventFilter(type="order.created"), lambda i: i % 2 == 1),
        "time": (time_filter, lambda i: 10 <= i < 40),
        "all": (everything, lambda i: i % 3 != 1 and i % 2 == 0 and 10 <= i < 40),
        "none": (event_pb2.EventFilter(), lambda i: True),
    }
    for name, (event_filter, expected) in cases.items():
        want = [q.event.id for i, q in enumerate(batch) if expected(i)]
        got = [s.event.id for s in await query_all(gateway, event_filter, page_size=7)]
        assert got == want, name
        assert await count(gateway, event_filter) == len(want), name


async def test_stored_event_carries_every_field(processor: Stub, gateway: Stub) -> None:
    when = dt.datetime(2024, 5, 1, 9, 30, 15, 123456, tzinfo=dt.UTC)
    with_time = queued(
        "alpha",
        event_time=when,
        payload=b"\x00\xffnot json",
        attributes={"tenant": "acme", "traceparent": "00-abc-01"},
        content_type="application/octet-stream",
        producer="alice",
    )
    without_time = queued("beta")
    await processor.StoreEvents(store_request([with_time, without_time], partition=7), timeout=5)
    first, second = await query_all(gateway)
    assert first.event == with_time.event
    assert (first.partition, first.producer) == (7, "alice")
    assert first.ingest_time == with_time.ingest_time
    stored_at = first.store_time.ToDatetime(tzinfo=dt.UTC)
    assert abs(stored_at - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
    assert first.sequence < second.sequence
    # Unset event_time falls back to ingest_time; empty content_type to the documented default.
    assert second.event.event_time == without_time.ingest_time
    assert second.event.content_type == "application/json"
    assert dict(second.event.attributes) == {}


async def test_columns_are_stored_as_the_batch_is(processor: Stub, gateway: Stub) -> None:
    # The queue's columnar form (what ingest writes) and its former form store the same rows.
    when = dt.datetime(2024, 5, 1, 9, 30, 15, 123456, tzinfo=dt.UTC)
    events = [
        queued(
            "alpha",
            event_time=when,
            attributes={"tenant": "acme"},
            content_type="application/cbor",
            producer="alice",
        ),
        queued("beta", content_type="text/plain"),
    ]
    columns = as_columns(event_pb2.QueuedBatch(events=events, partition=7))
    reply = await processor.StoreEvents(storage_pb2.StoreEventsRequest(columns=columns), timeout=5)
    assert (reply.inserted, reply.duplicates) == (2, 0)
    again = await processor.StoreEvents(store_request(events, partition=7), timeout=5)
    assert (again.inserted, again.duplicates) == (0, 2)
    first, second = await query_all(gateway)
    assert first.event == events[0].event
    assert (first.partition, first.producer, first.ingest_time) == (
        7,
        "alice",
        events[0].ingest_time,
    )
    assert second.event.event_time == events[1].ingest_time
    assert second.event.content_type == "text/plain"
    assert dict(second.event.attributes) == {}


@pytest.mark.parametrize(
    "events",
    [
        [("k", "p"), ("k\x1fk", "p")],  # a separator inside a value: bound as arrays
        [("k", "")],  # one event with an empty text: bound as arrays
        [("k", ""), ("k2", "")],  # empty texts in a joined batch
    ],
)
async def test_text_columns_survive_either_binding(
    processor: Stub, gateway: Stub, events: list[tuple[str, str]]
) -> None:
    # Storage binds the text columns joined by TEXT_SEPARATOR when it can, else as arrays:
    # every value comes back exactly either way.
    batch = [queued(key, producer=producer) for key, producer in events]
    reply = await processor.StoreEvents(store_request(batch), timeout=5)
    assert reply.inserted == len(batch)
    stored = await query_all(gateway)
    assert [(s.event.key, s.producer, s.event.id) for s in stored] == [
        (key, producer, q.event.id) for (key, producer), q in zip(events, batch, strict=True)
    ]


def test_texts_are_joined_only_when_the_separator_splits_them_back_exactly() -> None:
    def joined(*columns: list[str]) -> list[str]:
        return [TEXT_SEPARATOR.join(values) for values in columns]

    assert texts_joinable(joined(["a", "b"], ["", ""]), 2)
    assert not texts_joinable(joined(["a", "b\x1fc"], ["", ""]), 2)  # a value holds it
    assert not texts_joinable(joined(["a"]), 1)  # one value: "" would split into none
    assert not texts_joinable(joined(["a", "b"]), 3)


async def test_a_request_with_both_forms_is_invalid_argument(processor: Stub) -> None:
    events = [queued()]
    request = store_request(events)
    request.columns.CopyFrom(as_columns(request.batch))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await processor.StoreEvents(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not both" in (caught.value.details() or "")


async def test_bad_page_token_and_page_size_are_invalid_argument(
    processor: Stub, gateway: Stub
) -> None:
    await processor.StoreEvents(store_request([queued("a") for _ in range(3)]), timeout=5)
    page = await gateway.QueryEvents(
        storage_pb2.QueryEventsRequest(filter=event_pb2.EventFilter(keys=["a"]), page_size=1),
        timeout=5,
    )
    assert page.next_page_token
    forged = base64.urlsafe_b64encode(json.dumps({"s": "x", "f": "y"}).encode()).decode()
    bad_requests = {
        "garbage": storage_pb2.QueryEventsRequest(page_token="%%%not-a-token"),
        "not json": storage_pb2.QueryEventsRequest(page_token="bm90IGpzb24"),
        "wrong shape": storage_pb2.QueryEventsRequest(page_token=forged),
        "other filter": storage_pb2.QueryEventsRequest(
            filter=event_pb2.EventFilter(keys=["b"]), page_token=page.next_page_token
        ),
        "negative size": storage_pb2.QueryEventsRequest(page_size=-1),
    }
    for name, request in bad_requests.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.QueryEvents(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        expected_field = "page_size" if "size" in name else "page_token"
        assert field_violations(caught.value) == [expected_field], name
    # AIP-158: a page_size above the maximum is lowered to it, not refused.
    whole = await gateway.QueryEvents(storage_pb2.QueryEventsRequest(page_size=10**6), timeout=5)
    assert len(whole.events) == 3 and not whole.next_page_token


async def test_empty_event_id_is_invalid_and_nothing_is_stored(
    processor: Stub, engine: AsyncEngine
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await processor.StoreEvents(store_request([queued(), queued(event_id="")]), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == ["batch.events[1].event.id"]
    assert await rows_in_table(engine) == 0


async def test_input_postgres_would_refuse_is_invalid_argument_not_internal(
    processor: Stub, gateway: Stub, engine: AsyncEngine
) -> None:
    far_future = queued()
    far_future.event.event_time.seconds = 253_402_300_800  # 10000-01-01
    no_ingest_time = queued()
    no_ingest_time.ClearField("ingest_time")
    batch = [
        queued("nul\x00key"),
        queued(attributes={"a": "b\x00"}),
        far_future,
        no_ingest_time,
        queued(event_id="x" * 129),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await processor.StoreEvents(store_request(batch, partition=2**31), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == [
        "batch.partition",
        "batch.events[0].event.key",
        "batch.events[1].event.attributes",
        "batch.events[2].event.event_time",
        "batch.events[3].ingest_time",
        "batch.events[4].event.id",
    ]
    assert await rows_in_table(engine) == 0
    bad_filters = {
        "filter.keys": event_pb2.EventFilter(keys=[f"k{i}" for i in range(101)]),
        "filter.type": event_pb2.EventFilter(type="t" * 257),
        "filter.keys[1]": event_pb2.EventFilter(keys=["ok", "nul\x00"]),
    }
    for field, bad_filter in bad_filters.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.CountEvents(storage_pb2.CountEventsRequest(filter=bad_filter), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field_violations(caught.value) == [field]


async def test_oversized_batch_is_invalid_argument(processor: Stub) -> None:
    events = [queued(event_id=str(i)) for i in range(10_001)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await processor.StoreEvents(store_request(events), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == ["batch.events"]


async def test_large_payloads_split_pages_below_the_message_limit(
    start_server: StartServer, engine: AsyncEngine, connect: Connect
) -> None:
    mesh = await start_server(engine, max_message_bytes=64 * 1024)
    writer, reader = connect(mesh.port, "processor"), connect(mesh.port, "gateway")
    batch = [queued(payload=bytes(20_000)) for _ in range(6)]
    for one in batch:  # each batch must itself fit the 64 KiB limit
        await writer.StoreEvents(store_request([one]), timeout=5)
    page = await reader.QueryEvents(storage_pb2.QueryEventsRequest(page_size=6), timeout=5)
    assert 0 < len(page.events) < 6 and page.next_page_token
    stored = await query_all(reader, page_size=6)
    assert [s.event.id for s in stored] == [q.event.id for q in batch]


async def test_policy_separates_writers_from_readers(server: MeshServer, connect: Connect) -> None:
    gateway, processor = connect(server.port, "gateway"), connect(server.port, "processor")
    denied = [
        gateway.StoreEvents(store_request([queued()]), timeout=5),
        processor.QueryEvents(storage_pb2.QueryEventsRequest(), timeout=5),
        processor.CountEvents(storage_pb2.CountEventsRequest(), timeout=5),
        connect(server.port, "ingest").CountEvents(storage_pb2.CountEventsRequest(), timeout=5),
        # The operator certificate is granted nothing in storage (nothing is implied for it).
        connect(server.port, "admin").CountEvents(storage_pb2.CountEventsRequest(), timeout=5),
        connect(server.port, "admin").StoreEvents(store_request([queued()]), timeout=5),
    ]
    for call in denied:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await gateway.CountEvents(storage_pb2.CountEventsRequest(), timeout=5)).count == 0
