"""Timestamps across the whole google.protobuf.Timestamp range, to the nanosecond, through real
storage and Postgres: what is stored comes back exactly, filters at the edges work, and a row the
store cannot render never fails a page."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.times import MAX_TIMESTAMP, MIN_TIMESTAMP
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.envelope import MAX_SECONDS, MIN_SECONDS
from streammesh.mesh.postgres import load_migrations, migrate
from tests.conftest import run_sql
from tests.storage.conftest import Stub, queued
from tests.storage.test_storage import count, field_violations, query_all, store_request

LAST = Timestamp(seconds=MAX_SECONDS, nanos=999_999_999)  # 9999-12-31T23:59:59.999999999Z
FIRST = Timestamp(seconds=MIN_SECONDS, nanos=0)  # 0001-01-01T00:00:00Z

EDGES = {
    "the last nanosecond": LAST,
    "the last microsecond": Timestamp(seconds=MAX_SECONDS, nanos=999_999_000),
    "the first instant": FIRST,
    "the first microsecond plus a nanosecond": Timestamp(seconds=MIN_SECONDS, nanos=1_001),
    "just before the epoch": Timestamp(seconds=-1, nanos=999_999_999),
    "the epoch": Timestamp(seconds=0, nanos=0),
    "nanoseconds": Timestamp(seconds=1_700_000_000, nanos=123_456_789),
}


def _at(event_id: str, when: Timestamp, key: str = "k") -> event_pb2.QueuedEvent:
    event = queued(key, event_id=event_id)
    event.event.event_time.CopyFrom(when)
    return event


async def test_every_edge_time_round_trips_to_the_nanosecond(
    processor: Stub, gateway: Stub
) -> None:
    batch = [_at(name, when) for name, when in EDGES.items()]
    reply = await processor.StoreEvents(store_request(batch), timeout=5)
    assert reply.inserted == len(EDGES)
    stored = await query_all(gateway, page_size=2)  # unfiltered paging across the edge rows
    assert {s.event.id: s.event.event_time for s in stored} == EDGES
    assert all(s.ingest_time == batch[0].ingest_time for s in stored)
    assert await count(gateway) == len(EDGES)


async def test_filters_at_the_edges_are_exact_to_the_nanosecond(
    processor: Stub, gateway: Stub
) -> None:
    batch = [_at(name, when) for name, when in EDGES.items()]
    await processor.StoreEvents(store_request(batch), timeout=5)
    micro = Timestamp(seconds=1_700_000_000, nanos=123_456_789)
    next_nano = Timestamp(seconds=1_700_000_000, nanos=123_456_790)
    cases: list[tuple[Timestamp | None, Timestamp | None, set[str]]] = [
        # The whole range: start inclusive, end exclusive, so the very last nanosecond is out.
        (FIRST, LAST, set(EDGES) - {"the last nanosecond"}),
        (FIRST, None, set(EDGES)),
        (None, FIRST, set()),
        (LAST, None, {"the last nanosecond"}),
        # One nanosecond apart inside one microsecond.
        (micro, None, {"nanoseconds", "the last microsecond", "the last nanosecond"}),
        (next_nano, None, {"the last microsecond", "the last nanosecond"}),
        (None, next_nano, set(EDGES) - {"the last microsecond", "the last nanosecond"}),
        (
            None,
            micro,
            {"the first instant", "the first microsecond plus a nanosecond"}
            | {"just before the epoch", "the epoch"},
        ),
        (
            Timestamp(seconds=MIN_SECONDS, nanos=1_000),
            Timestamp(seconds=MIN_SECONDS, nanos=1_002),
            {"the first microsecond plus a nanosecond"},
        ),
    ]
    for start, end, want in cases:
        event_filter = event_pb2.EventFilter(start_time=start, end_time=end)
        got = {s.event.id for s in await query_all(gateway, event_filter, page_size=3)}
        assert got == want, (start, end)
        assert await count(gateway, event_filter) == len(want), (start, end)


@pytest.mark.parametrize(
    "bound",
    [
        Timestamp(seconds=MAX_SECONDS + 1),
        Timestamp(seconds=MIN_SECONDS - 1, nanos=999_999_999),
        Timestamp(seconds=0, nanos=-1),
        Timestamp(seconds=0, nanos=1_000_000_000),
    ],
)
async def test_a_filter_bound_outside_the_range_is_invalid_argument(
    gateway: Stub, bound: Timestamp
) -> None:
    for field in ("start_time", "end_time"):
        event_filter = event_pb2.EventFilter()
        getattr(event_filter, field).CopyFrom(bound)
        for call in (
            gateway.QueryEvents(storage_pb2.QueryEventsRequest(filter=event_filter), timeout=5),
            gateway.CountEvents(storage_pb2.CountEventsRequest(filter=event_filter), timeout=5),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field_violations(caught.value) == [f"filter.{field}"]


async def test_rows_the_store_cannot_render_are_clamped_not_an_outage(
    processor: Stub,
    gateway: Stub,
    engine: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await processor.StoreEvents(
        store_request([queued("k", event_id=f"ok-{i}") for i in range(3)]), timeout=5
    )
    # Rows no ingest would write, put there by hand or by an older release: infinities, a year
    # past 9999, attributes that are not strings.
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO events (id, key, type, event_time, payload, content_type, attributes,"
                " partition, ingest_time, producer) VALUES"
                " ('inf', 'k', 't', 'infinity', '', 'x', '{}', 1, '-infinity', 'p'),"
                " ('far', 'k', 't', '20000-01-01Z', '', 'x', '{\"n\": 1, \"s\": \"v\"}', 1,"
                "  now(), 'p')"
            )
        )
    await processor.StoreEvents(store_request([queued("k", event_id="ok-3")]), timeout=5)
    with caplog.at_level(logging.WARNING, logger="services.storage"):
        stored = await query_all(gateway, page_size=2)
    by_id = {s.event.id: s for s in stored}
    assert list(by_id) == ["ok-0", "ok-1", "ok-2", "inf", "far", "ok-3"]
    assert by_id["inf"].event.event_time == MAX_TIMESTAMP
    assert by_id["inf"].ingest_time == MIN_TIMESTAMP
    assert by_id["far"].event.event_time == MAX_TIMESTAMP
    assert dict(by_id["far"].event.attributes) == {"n": "1", "s": "v"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one per page that had some
    assert "inf" in warnings[0].getMessage()
    # The filters still treat them as the instants Postgres holds.
    assert await count(gateway, event_pb2.EventFilter(start_time=LAST)) == 2


async def test_the_migration_repairs_rows_an_older_release_stored_as_infinity(
    database_url: str, pg_schema: str, engine: AsyncEngine
) -> None:
    # asyncpg encodes datetime(9999, 12, 31, 23, 59, 59, 999999) and datetime(1, 1, 1) as
    # +-infinity: that is how the edge instants were stored before 0004.
    older = [m for m in load_migrations("services.storage.migrations") if m.version < 4]
    await run_sql(database_url, f'DROP SCHEMA "{pg_schema}" CASCADE')
    await migrate(engine, schema=pg_schema, migrations=older)
    await run_sql(
        database_url,
        f'INSERT INTO "{pg_schema}".events (id, key, type, event_time, payload, content_type,'  # noqa: S608
        " partition, ingest_time, producer) VALUES"
        " ('late', 'k', 't', 'infinity', '', 'x', 1, now(), 'p'),"
        " ('early', 'k', 't', '-infinity', '', 'x', 1, now(), 'p')",
    )
    await migrate(
        engine, schema=pg_schema, migrations=load_migrations("services.storage.migrations")
    )
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT id, event_time IN ('9999-12-31 23:59:59.999999Z', '0001-01-01 00:00:00Z'),"
                " event_time_nanos FROM events ORDER BY seq"
            )
        )
        assert [tuple(r) for r in rows] == [("late", True, 0), ("early", True, 0)]
