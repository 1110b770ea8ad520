"""events partitioned by ingest_time (migration 0012) and its maintenance
(services.storage.partitions), on real Postgres: idempotency on (tenant, id) across partitions,
inserts outside every daily partition, retention while writers insert, a tenant's shorter
retention, one maintenance pass at a time, the paging horizon's lock on `events`, the upgrade."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.partitions import (
    PartitionPolicy,
    maintain,
    range_partitions,
    run_maintenance,
)
from services.storage.sql import INSERT_BATCH
from services.storage.store import BatchColumns, EventStore
from services.storage.times import PG_EPOCH_SECONDS, use_integer_timestamps
from streammesh.mesh.postgres import create_engine, create_pool, load_migrations, migrate
from tests.storage.conftest import schema_connection, storage_settings

DAY = timedelta(days=1)
DAY0 = datetime(2026, 3, 1, tzinfo=UTC)
"""The maintenance passes' `now`: their partitions are March 2026's."""
_ids = itertools.count()


def pg_micros(moment: datetime) -> int:
    return int((moment.timestamp() - PG_EPOCH_SECONDS) * 1_000_000)


def batch(*events: tuple[str, str, datetime]) -> BatchColumns:
    """(tenant, id, ingest time) each; the rest fixed."""
    columns = BatchColumns.empty()
    for tenant, event_id, ingest in events:
        columns.append(
            id=event_id,
            key="k",
            type="t",
            event_time=(pg_micros(ingest), 0),
            payload=b"{}",
            content_type="application/json",
            attributes="{}",
            ingest_time=pg_micros(ingest),
            producer="p",
            tenant=tenant,
        )
    return columns


@pytest.fixture
async def pool(engine: AsyncEngine, database_url: str, pg_schema: str) -> AsyncIterator[Any]:
    pool = await create_pool(
        database_url, schema=pg_schema, application_name="t", size=4, init=use_integer_timestamps
    )
    yield pool
    await pool.close()


@pytest.fixture
async def conn(engine: AsyncEngine, database_url: str, pg_schema: str) -> AsyncIterator[Any]:
    """A connection whose schema has March 2026's first days as partitions, and no longer the
    one the migration made for everything before its day (empty here)."""
    async with schema_connection(database_url, pg_schema) as connection:
        for name in await range_partitions(connection):
            await connection.execute(f"DROP TABLE {name}")
        report = await maintain(connection, PartitionPolicy(days_ahead=4), now=DAY0)
        assert report.created == [f"events_p202603{day:02}" for day in range(1, 6)]
        yield connection


async def where_stored(conn: Any) -> list[tuple[str, str, str]]:
    rows = await conn.fetch("SELECT tenant, id, tableoid::regclass::text FROM events ORDER BY seq")
    return [tuple(row) for row in rows]


async def test_an_id_is_stored_once_across_partitions(conn: Any, pool: Any) -> None:
    store = EventStore(pool)
    day1, day2 = DAY0 + timedelta(hours=1), DAY0 + timedelta(days=1, hours=1)
    assert await store.insert_batch(batch(("a", "x", day1)), partition=0) == 1
    # A redelivery (same ingest time), a new publish of the id (another day's partition), and
    # the same id in one batch under two ingest times: all skipped; another tenant's id is new.
    assert await store.insert_batch(batch(("a", "x", day1)), partition=0) == 0
    assert await store.insert_batch(batch(("a", "x", day2)), partition=0) == 0
    both = batch(("a", "y", day2), ("a", "y", day1), ("b", "x", day2))
    assert await store.insert_batch(both, partition=0) == 2
    assert await where_stored(conn) == [
        ("a", "x", "events_p20260301"),
        ("a", "y", "events_p20260302"),
        ("b", "x", "events_p20260302"),
    ]
    assert await conn.fetchval("SELECT count(*) FROM event_ids") == 3


async def test_a_race_for_a_new_id_stores_it_once(conn: Any, pool: Any) -> None:
    """Two inserts of the same new id at once (one under another ingest time, in another
    partition): the one that commits second fails on event_ids' key and is run again by the
    store, which then skips the id; nothing fails."""
    store = EventStore(pool)
    day1, day2 = DAY0 + timedelta(hours=1), DAY0 + timedelta(days=1, hours=1)
    async with pool.acquire() as first:
        async with first.transaction():
            first_rows = batch(("a", "race", day1), ("a", "mine", day1))
            await first.execute(
                INSERT_BATCH, first_rows.ids, first_rows.keys, first_rows.types,
                first_rows.event_times, first_rows.event_time_nanos, first_rows.payloads,
                first_rows.content_types, first_rows.attributes, first_rows.ingest_times,
                first_rows.producers, 0, first_rows.tenants,
            )  # fmt: skip
            second = asyncio.create_task(
                store.insert_batch(batch(("a", "race", day2), ("a", "theirs", day2)), partition=0)
            )
            await asyncio.sleep(0.3)  # the second waits on the first's uncommitted key
            assert not second.done()
        assert await second == 1
    assert await where_stored(conn) == [
        ("a", "race", "events_p20260301"),
        ("a", "mine", "events_p20260301"),
        ("a", "theirs", "events_p20260302"),
    ]


async def test_an_insert_outside_every_partition_is_stored(conn: Any, pool: Any) -> None:
    store = EventStore(pool)
    future, past = datetime(2300, 1, 1, tzinfo=UTC), datetime(1990, 1, 1, tzinfo=UTC)
    assert await store.insert_batch(batch(("a", "f", future), ("a", "p", past)), partition=0) == 2
    assert await where_stored(conn) == [
        ("a", "f", "events_default"),
        ("a", "p", "events_default"),
    ]
    # A pass does not create a day whose rows sit in the default partition: they stay there.
    rows = batch(("a", "soon", DAY0 + timedelta(days=6, hours=3)))
    assert await store.insert_batch(rows, partition=0) == 1
    report = await maintain(conn, PartitionPolicy(days_ahead=7), now=DAY0)
    assert report.created == ["events_p20260306", "events_p20260308"]
    assert ("a", "soon", "events_default") in await where_stored(conn)


async def test_retention_drops_partitions_while_writers_insert(conn: Any, pool: Any) -> None:
    store = EventStore(pool)
    days = [DAY0 + timedelta(days=n, hours=2) for n in range(5)]
    written: list[tuple[str, datetime]] = []

    async def write(rounds: int) -> None:
        for _ in range(rounds):
            rows = [("a", f"e{next(_ids)}", day) for day in days]
            assert await store.insert_batch(batch(*rows), partition=0) == len(rows)
            written.extend((event_id, day) for _, event_id, day in rows)
            await asyncio.sleep(0)

    await write(20)
    policy = PartitionPolicy(days_ahead=4, retention_days=2, batch_rows=7, lock_timeout_ms=50)
    writers = [asyncio.create_task(write(60)) for _ in range(3)]
    report = await maintain(conn, policy, now=DAY0 + timedelta(days=4))
    await asyncio.gather(*writers)  # every insert succeeded (each asserts its count)

    assert report.dropped == ["events_p20260301", "events_p20260302"]
    kept = {event_id for event_id, day in written if day >= DAY0 + timedelta(days=2)}
    stored = {row[1]: row[2] for row in await where_stored(conn)}
    assert kept <= set(stored)
    # Writes of the dropped days after their DETACH went to the default partition.
    assert {stored[i] for i in set(stored) - kept} <= {"events_default"}
    # event_ids holds exactly the stored events' ids: the dropped ones were freed.
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM event_ids AS i FULL JOIN events AS e USING (tenant, id, ingest_time)"
            " WHERE i.id IS NULL OR e.id IS NULL"
        )
        == 0
    )
    # Beyond the retention an id is free again: a new publish of a dropped event is stored.
    (old,) = [event_id for event_id, day in written[:1]]
    assert old not in stored
    assert await store.insert_batch(batch(("a", old, days[4])), partition=0) == 1


async def test_a_drop_waits_briefly_for_a_writer_and_resumes_later(conn: Any, pool: Any) -> None:
    """A DETACH that cannot have its lock (a write transaction stays open) gives up after its
    tries, leaving the partition for the next pass; a table a pass detached but did not drop
    (it stopped in between) is finished by the next one."""
    store = EventStore(pool)
    assert (
        await store.insert_batch(
            batch(("a", "old", DAY0), ("a", "new", DAY0 + 3 * DAY)), partition=0
        )
        == 2
    )
    policy = PartitionPolicy(days_ahead=4, retention_days=2, lock_timeout_ms=20, lock_attempts=2)
    later = DAY0 + 4 * DAY
    async with pool.acquire() as writer, writer.transaction():
        rows = batch(("a", "open", DAY0 + 3 * DAY))
        await writer.execute(
            INSERT_BATCH, rows.ids, rows.keys, rows.types, rows.event_times, rows.event_time_nanos,
            rows.payloads, rows.content_types, rows.attributes, rows.ingest_times, rows.producers,
            0, rows.tenants,
        )  # fmt: skip
        held = await maintain(conn, policy, now=later)
    # The days ahead were attached beside the open write; the drop waited, then gave up.
    assert held.created == [f"events_p202603{day:02}" for day in range(6, 10)]
    assert held.dropped == [] and "events_p20260301" in await range_partitions(conn)
    await conn.execute("ALTER TABLE events DETACH PARTITION events_p20260301")  # a pass stopped
    resumed = await maintain(conn, policy, now=later)
    assert resumed.dropped == ["events_p20260301", "events_p20260302"]
    assert [row[1] for row in await where_stored(conn)] == ["new", "open"]
    assert await conn.fetchval("SELECT array_agg(id ORDER BY id) FROM event_ids") == ["new", "open"]


async def test_a_tenant_retention_shorter_than_the_global_one(conn: Any, pool: Any) -> None:
    store = EventStore(pool)
    rows = [(tenant, f"{tenant}{n}", DAY0 + timedelta(days=n, hours=1)) for tenant in "ab"
            for n in range(4)]  # fmt: skip
    assert await store.insert_batch(batch(*rows), partition=0) == 8
    policy = PartitionPolicy(
        days_ahead=4, retention_days=30, tenant_retention_days={"a": 2}, batch_rows=1
    )
    report = await maintain(conn, policy, now=DAY0 + timedelta(days=3, hours=12))
    assert report.dropped == [] and report.deleted_rows == 2
    assert [row[1] for row in await where_stored(conn)] == ["a2", "a3", "b0", "b1", "b2", "b3"]
    assert await conn.fetchval("SELECT count(*) FROM event_ids") == 6
    assert await store.insert_batch(batch(("a", "a0", DAY0 + timedelta(days=3))), partition=0) == 1


async def test_one_maintenance_pass_at_a_time(conn: Any, database_url: str, pg_schema: str) -> None:
    policy = PartitionPolicy(days_ahead=9)
    async with schema_connection(database_url, pg_schema) as other:
        key = await other.fetchval(
            "SELECT hashtext(current_schema() || '.events partition maintenance')"
        )
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", key)
        held = await maintain(conn, policy, now=DAY0)
        assert not held.ran and held.created == []
        await other.execute("SELECT pg_advisory_unlock($1)", key)
        # Two replicas at once: each day is created once, by one of them.
        first, second = await asyncio.gather(
            maintain(conn, policy, now=DAY0), maintain(other, policy, now=DAY0)
        )
    assert sorted(first.created + second.created) == [f"events_p202603{d:02}" for d in range(6, 11)]
    again = await maintain(conn, policy, now=DAY0)
    assert again.ran and again.created == [] and again.dropped == []


async def test_the_background_task_keeps_the_days_ahead(conn: Any, pool: Any) -> None:
    """What each storage replica runs (services/storage/server.py): passes on the real clock."""
    task = asyncio.create_task(
        run_maintenance(pool, PartitionPolicy(days_ahead=2), interval_seconds=0.05)
    )
    today = datetime.now(UTC)
    wanted = {f"events_p{today + timedelta(days=n):%Y%m%d}" for n in range(3)}
    try:
        for _ in range(100):
            if wanted <= set(await range_partitions(conn)):
                break
            await asyncio.sleep(0.05)
        assert wanted <= set(await range_partitions(conn))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_insert_through_events_shows_in_its_locks(conn: Any, pool: Any) -> None:
    """The paging horizon reads writers' locks on `events` (queries.py): a row routed to a
    partition still locks the parent, for the whole transaction."""
    async with pool.acquire() as writer, writer.transaction():
        await writer.execute(
            INSERT_BATCH, ["l1"], ["k"], ["t"], [pg_micros(DAY0)], [0], [b"{}"], ["application/json"],
            ["{}"], [pg_micros(DAY0)], ["p"], 0, ["a"],
        )  # fmt: skip
        pid = await writer.fetchval("SELECT pg_backend_pid()")
        modes = await conn.fetch(
            "SELECT mode FROM pg_locks WHERE pid = $1 AND locktype = 'relation'"
            " AND relation = 'events'::regclass",
            pid,
        )
        assert [row[0] for row in modes] == ["RowExclusiveLock"]


async def test_the_upgrade_keeps_rows_seq_and_store_time(database_url: str, pg_schema: str) -> None:
    migrations = load_migrations("services.storage.migrations")
    engine = create_engine(database_url, schema=pg_schema, application_name="t")
    try:
        await migrate(engine, schema=pg_schema, migrations=migrations[:11])
        async with schema_connection(database_url, pg_schema) as connection:
            await connection.execute(
                "INSERT INTO events (tenant, id, key, type, event_time, payload, content_type,"
                " partition, ingest_time, producer)"
                " SELECT 'a', 'u' || n, 'k', 't', now(), '', '', 0, now() - n * interval '1 day',"
                " 'p' FROM generate_series(1, 5) AS n"
            )
            await connection.execute("DELETE FROM events WHERE id = 'u5'")  # seq 5 is spent
            before = await connection.fetch("SELECT seq, id, store_time FROM events ORDER BY seq")
            await migrate(engine, schema=pg_schema, migrations=migrations)
            assert (
                await connection.fetch("SELECT seq, id, store_time FROM events ORDER BY seq")
                == before
            )
            assert await connection.fetchval("SELECT count(*) FROM event_ids") == 4
            await connection.execute(
                INSERT_BATCH, ["u1", "n"], ["k"] * 2, ["t"] * 2, [0, 0], [0, 0], [b""] * 2,
                [""] * 2, ["{}"] * 2, [0, 0], ["p"] * 2, 0, ["a"] * 2,
            )  # fmt: skip
            assert await connection.fetchval("SELECT seq FROM events WHERE id = 'n'") == 6
            assert (
                await connection.fetchval(
                    "SELECT seqcache FROM pg_sequence"
                    " WHERE seqrelid = pg_get_serial_sequence('events', 'seq')::regclass"
                )
                == 1
            )
            assert (
                await connection.fetchval(
                    "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef"
                    " WHERE adrelid = 'events'::regclass AND adnum = (SELECT attnum FROM pg_attribute"
                    " WHERE attrelid = 'events'::regclass AND attname = 'store_time')"
                )
                == "clock_timestamp()"
            )
    finally:
        await engine.dispose()


async def test_settings_refuse_a_tenant_retention_longer_than_the_global_one(
    pki_dir: Path,
) -> None:
    with pytest.raises(ValueError, match="longer than retention_days"):
        storage_settings(pki_dir, retention_days=7, tenant_retention_days={"a": 8})
    settings = storage_settings(pki_dir, retention_days=7, tenant_retention_days={"a": 3})
    assert settings.partition_policy().tenant_retention_days == {"a": 3}
