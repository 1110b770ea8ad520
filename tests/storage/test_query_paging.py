"""QueryEvents paging while writers commit (services.storage.queries.PAGING_GUARANTEE), over
real mTLS and Postgres: a lower seq committed late is returned on a later page, not passed by
the cursor; pages taken while several writers insert, some holding their transaction open
before they commit or roll back, return every event at or below the final cursor exactly once;
and the table keeps what the guarantee rests on."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.queries import Page, settled_prefix
from services.storage.sql import INSERT_BATCH
from services.storage.store import StoredRow
from streammesh.api.storage.v1 import storage_pb2
from tests.storage.conftest import Stub, queued, schema_connection
from tests.storage.test_storage import store_request

_BY_HAND = (
    "INSERT INTO events (id, key, type, event_time, payload, content_type, attributes,"
    " partition, ingest_time, producer) VALUES ($1, 'k', 't', now(), '', '', '{}', 0, now(), 'p')"
    " RETURNING seq"
)


@contextlib.asynccontextmanager
async def _open_transaction(database_url: str, pg_schema: str) -> AsyncIterator[tuple[Any, Any]]:
    """A connection of its own on the test's schema, in a transaction the test ends."""
    async with schema_connection(database_url, pg_schema) as conn:
        transaction = conn.transaction()
        await transaction.start()
        yield conn, transaction


async def _page(stub: Stub, token: str = "", size: int = 1) -> tuple[list[str], str]:
    page = await stub.QueryEvents(
        storage_pb2.QueryEventsRequest(page_size=size, page_token=token), timeout=5
    )
    return [stored.event.id for stored in page.events], page.next_page_token


async def test_a_lower_seq_committed_late_is_returned_on_a_later_page(
    processor: Stub, gateway: Stub, database_url: str, pg_schema: str
) -> None:
    """A transaction draws a seq and holds it; a later one commits a higher seq first. The
    page stops before the higher one (empty, with a token) until the lower one is decided:
    committed, it comes next and then the higher one; nothing is skipped or repeated."""
    await processor.StoreEvents(store_request([queued("k", event_id="first")]), timeout=5)
    async with _open_transaction(database_url, pg_schema) as (slow, transaction):
        late_seq = await slow.fetchval(_BY_HAND, "late")
        await processor.StoreEvents(store_request([queued("k", event_id="after")]), timeout=5)
        ids, token = await _page(gateway)
        assert ids == ["first"] and token
        for _ in range(3):  # held back for as long as the lower seq is in flight
            ids, token = await _page(gateway, token)
            assert ids == [] and token
        await transaction.commit()
    ids, token = await _page(gateway, token)
    assert ids == ["late"] and token
    ids, token = await _page(gateway, token)
    assert ids == ["after"] and token == ""
    seqs = [
        s.sequence for s in (await gateway.QueryEvents(storage_pb2.QueryEventsRequest())).events
    ]
    assert seqs[1] == late_seq < seqs[2]  # "late" did hold the lower seq


async def test_a_lower_seq_rolled_back_holds_pages_only_while_in_flight(
    processor: Stub, gateway: Stub, database_url: str, pg_schema: str
) -> None:
    async with _open_transaction(database_url, pg_schema) as (slow, transaction):
        await slow.fetchval(_BY_HAND, "never")
        await processor.StoreEvents(store_request([queued("k", event_id="after")]), timeout=5)
        ids, token = await _page(gateway, size=10)
        assert ids == [] and token
        await transaction.rollback()
    ids, token = await _page(gateway, token, size=10)
    assert ids == ["after"] and token == ""


async def test_only_writes_to_the_events_table_hold_pages_back(
    processor: Stub, gateway: Stub, database_url: str, pg_schema: str
) -> None:
    """An open transaction that wrote another table (or only read events) does not."""
    async with _open_transaction(database_url, pg_schema) as (other, transaction):
        await other.execute(
            "INSERT INTO schema_subjects (tenant, event_type, latest_version) VALUES ('t', 'e', 1)"
        )
        await other.fetchval("SELECT count(*) FROM events")
        await processor.StoreEvents(store_request([queued("k", event_id="after")]), timeout=5)
        ids, token = await _page(gateway, size=10)
        await transaction.rollback()
    assert ids == ["after"] and token == ""


async def _paging_pass(gateway: Stub) -> list[tuple[str, int]]:
    """One client paging from the first event to a page without a token: (id, seq) of each
    event returned, in order."""
    returned: list[tuple[str, int]] = []
    token = ""
    for _ in range(5000):  # bounded: the table holds at most ~10,000 events
        page = await gateway.QueryEvents(
            storage_pb2.QueryEventsRequest(page_size=50, page_token=token), timeout=10
        )
        returned += [(s.event.id, s.sequence) for s in page.events]
        token = page.next_page_token
        if not token:
            return returned
        if not page.events:
            await asyncio.sleep(0.002)  # not settled yet: a write that started before is open
    raise AssertionError("paging did not reach the end")


async def test_pages_taken_while_writers_commit_skip_and_repeat_nothing(
    processor: Stub, gateway: Stub, engine: AsyncEngine, database_url: str, pg_schema: str
) -> None:
    """Storage's batch inserts from three tasks at once, and a writer that draws a seq, waits,
    then commits (or rolls back) after others committed higher seqs, while clients page from
    the first event to a page without a token, pass after pass. Once the writers are done,
    each pass's union is every stored event at or below its final cursor, in seq order, once."""
    rng = random.Random(158)
    await processor.StoreEvents(
        store_request([queued(f"k{i % 7}") for i in range(100)]), timeout=10
    )
    inversions = 0  # commits of a seq lower than one committed before

    async def batches() -> None:
        for _ in range(300):  # bounded; they stop with the slow writer
            if slow.done():
                return
            batch = [queued(f"k{i % 7}") for i in range(10)]
            await processor.StoreEvents(store_request(batch), timeout=10)

    async def slow_writer() -> None:
        nonlocal inversions
        async with schema_connection(database_url, pg_schema) as conn:
            for n in range(100):
                transaction = conn.transaction()
                await transaction.start()
                seq = await conn.fetchval(_BY_HAND, f"slow-{n}")
                await asyncio.sleep(rng.uniform(0, 0.01))
                if n % 6 == 5:
                    await transaction.rollback()
                    continue
                # Read committed: what the others committed meanwhile is visible here.
                inversions += await conn.fetchval("SELECT max(seq) FROM events") > seq
                await transaction.commit()

    slow = asyncio.create_task(slow_writer())
    writers = [slow, *(asyncio.create_task(batches()) for _ in range(3))]
    passes: list[list[tuple[str, int]]] = []
    try:
        while not all(writer.done() for writer in writers):
            passes.append(await _paging_pass(gateway))
    finally:
        await asyncio.gather(*writers)
    passes.append(await _paging_pass(gateway))
    async with engine.connect() as conn:
        stored = [tuple(row) for row in await conn.execute(text("SELECT id, seq FROM events"))]
    stored.sort(key=lambda row: row[1])
    assert inversions > 10, "the writers did not commit lower seqs late: the test proves nothing"
    assert len(passes) >= 2  # one at least while the writers ran
    for returned in passes:
        expected = [row for row in stored if row[1] <= returned[-1][1]]
        got = set(returned)
        skipped = [row for row in expected if row not in got]
        assert not skipped, f"skipped {len(skipped)} of {inversions} late: {skipped[:3]}"
        assert returned == expected  # each once, in seq order
    assert passes[-1] == stored  # after the writers, the last page leaves nothing behind


def _row(seq: int, store_time: int) -> StoredRow:
    return StoredRow(seq, f"e{seq}", "k", "t", 0, 0, b"", "", "{}", 0, 0, store_time, "p")


def test_a_page_stops_at_the_first_row_not_settled() -> None:
    """Not filtered: a settled row past an unsettled one would move the cursor past it."""
    rows = [_row(1, 10), _row(2, 30), _row(3, 20)]
    assert settled_prefix(rows, horizon=25, limit=10) == Page(rows[:1], more=True)
    assert settled_prefix(rows, horizon=31, limit=10).rows == rows
    assert not settled_prefix(rows, horizon=31, limit=10).more
    assert settled_prefix(rows, horizon=31, limit=2).rows == rows[:2]  # the row past the page
    assert settled_prefix(rows, horizon=31, limit=2).more
    assert settled_prefix(rows, horizon=10, limit=10).rows == []  # store_time == horizon
    assert settled_prefix([], horizon=10, limit=10).more is False


@pytest.mark.usefixtures("engine")
async def test_the_table_keeps_what_paging_rests_on(database_url: str, pg_schema: str) -> None:
    """seq is handed out in the order of real time (CACHE 1: a cached range per session would
    let a later insert draw a lower seq), and storage's INSERT reads store_time per row, after
    its seq (the projection evaluates the columns in order)."""
    async with schema_connection(database_url, pg_schema) as conn:
        cache = await conn.fetchval(
            "SELECT seqcache FROM pg_sequence"
            " WHERE seqrelid = pg_get_serial_sequence('events', 'seq')::regclass"
        )
        one = [["x"], ["k"], ["t"], [0], [0], [b""], [""], ["{}"], [0], ["p"], 0, ["default"]]
        plan = "\n".join(
            row[0] for row in await conn.fetch("EXPLAIN (VERBOSE, COSTS OFF)" + INSERT_BATCH, *one)
        )
    assert cache == 1
    projection = next(line for line in plan.splitlines() if "nextval(" in line)
    assert 0 < projection.index("nextval(") < projection.index("clock_timestamp()"), plan
