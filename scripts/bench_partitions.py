"""What partitioning events by ingest_time (migration 0012) costs storage's insert: 100k rows in
batches of 2,000 through the joined batch insert (services.storage.sql.INSERT_BATCH_JOINED) into
a fresh copy of the event store, in five layouts:

- unpartitioned: the store as migration 0011 left it, with the insert as it was then (one
  INSERT ... ON CONFLICT (tenant, id) DO NOTHING on its primary key), the baseline;
- partitioned: the store as the migrations make it now, with storage's insert (skips the ids
  event_ids holds, stores the rest in events and their ids in event_ids), all rows in one
  partition;
- partitioned, 40 days: the same with 40 daily partitions attached (the rows in one of them);
- ids claimed first: the design storage does not ship, event_ids written first (INSERT ... ON
  CONFLICT DO NOTHING RETURNING) and only the claimed rows stored, with events keeping a
  primary key (tenant, id, ingest_time);
- partition-local key: no event_ids, events' primary key (tenant, id, ingest_time) alone, which
  skips redeliveries (same ingest time) but not a second publish of an id: not sound, measured
  as the floor.

Wall time and the Postgres backend's CPU per event (from /proc, so run it on the database's
host), medians of `--rounds` interleaved runs; the harness is scripts/bench_payload_json.py's.

    .venv/bin/python -m scripts.bench_partitions --dsn postgresql://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from scripts.bench_payload_json import _batches, _cpu_seconds
from services.storage.partitions import PartitionPolicy, maintain, range_partitions
from services.storage.sql import INSERT_BATCH_JOINED, event_store_ddl
from services.storage.times import use_integer_timestamps

__all__ = ["main"]

# The batch as rows (b), text columns joined (services.storage.sql.INSERT_BATCH_JOINED's).
_ROWS = """
unnest(string_to_array($1::text, E'\\x1f'), string_to_array($2::text, E'\\x1f'),
       string_to_array($3::text, E'\\x1f'), $4::timestamptz[], $5::int2[], $6::bytea[],
       string_to_array($7::text, E'\\x1f'), string_to_array($8::text, E'\\x1f'),
       $9::timestamptz[], string_to_array($10::text, E'\\x1f'),
       string_to_array($12::text, E'\\x1f'))
WITH ORDINALITY AS b(id, key, type, event_time, event_time_nanos, payload, content_type,
                     attributes, ingest_time, producer, tenant, ordinality)
"""
# storage's statement up to migration 0011 (services/storage/sql.py before 0012), joined texts.
_UNPARTITIONED_INSERT = """
INSERT INTO events (tenant, id, key, type, event_time, event_time_nanos, payload, content_type,
                    attributes, partition, ingest_time, producer)
SELECT b.tenant, b.id, b.key, b.type, b.event_time, b.event_time_nanos, b.payload,
       b.content_type, b.attributes::jsonb, $11, b.ingest_time, b.producer
FROM {rows}
ORDER BY b.ordinality
ON CONFLICT ({key}) DO NOTHING
"""


async def _forty_days(conn: asyncpg.Connection) -> None:
    """40 daily partitions around the bench's ingest times (December 2025) instead of the one
    the migration made for everything before its day."""
    for name in await range_partitions(conn):
        await conn.execute(f"DROP TABLE {name}")
    start = datetime(2025, 12, 26, tzinfo=UTC) - timedelta(days=20)
    await maintain(conn, PartitionPolicy(days_ahead=39), now=start)


_ALL = len(event_store_ddl())
_CLAIMED_FIRST = """
WITH b AS (
    SELECT * FROM {rows}
), claimed AS (
    INSERT INTO event_ids (tenant, id, ingest_time, seq)
    SELECT b.tenant, b.id, b.ingest_time, 0 FROM b ORDER BY b.ordinality
    ON CONFLICT (tenant, id) DO NOTHING
    RETURNING tenant, id, ingest_time
)
INSERT INTO events (tenant, id, key, type, event_time, event_time_nanos, payload, content_type,
                    attributes, partition, ingest_time, producer)
SELECT b.tenant, b.id, b.key, b.type, b.event_time, b.event_time_nanos, b.payload,
       b.content_type, b.attributes::jsonb, $11, b.ingest_time, b.producer
FROM b JOIN claimed AS c ON c.tenant = b.tenant AND c.id = b.id AND c.ingest_time = b.ingest_time
ORDER BY b.ordinality
ON CONFLICT (tenant, id, ingest_time) DO NOTHING
"""


async def _local_key(conn: asyncpg.Connection) -> None:
    await conn.execute("ALTER TABLE events ADD PRIMARY KEY (tenant, id, ingest_time)")


async def _local_key_only(conn: asyncpg.Connection) -> None:
    await _local_key(conn)
    await conn.execute("DROP TABLE event_ids")


# name: (migrations applied, insert statement, set-up after the migrations)
_LAYOUTS = {
    "unpartitioned": (11, _UNPARTITIONED_INSERT.format(rows=_ROWS, key="tenant, id"), None),
    "partitioned": (_ALL, INSERT_BATCH_JOINED, None),
    "partitioned, 40 days": (_ALL, INSERT_BATCH_JOINED, _forty_days),
    "ids claimed first": (_ALL, _CLAIMED_FIRST.format(rows=_ROWS), _local_key),
    "partition-local key": (
        _ALL,
        _UNPARTITIONED_INSERT.format(rows=_ROWS, key="tenant, id, ingest_time"),
        _local_key_only,
    ),
}


async def _run(dsn: str, layout: str, batches: list[list[object]]) -> tuple[float, float]:
    migrations, statement, setup = _LAYOUTS[layout]
    schema = f"bench_parts_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"SET search_path TO {schema}")
        for ddl in event_store_ddl()[:migrations]:
            await conn.execute(ddl)
        await use_integer_timestamps(conn)
        if setup is not None:
            await setup(conn)
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        cpu, wall = _cpu_seconds(pid), time.perf_counter()
        for batch in batches:
            await conn.execute(statement, *batch)
        elapsed, used = time.perf_counter() - wall, _cpu_seconds(pid) - cpu
        assert await conn.fetchval("SELECT count(*) FROM events") == sum(len(b[4]) for b in batches)
        return elapsed, used
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


async def _main(dsn: str, rows: int, rounds: int) -> None:
    batches = _batches(rows, 2000)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in _LAYOUTS}
    for _ in range(rounds):
        for name in _LAYOUTS:  # interleaved, so drift hits every layout alike
            results[name].append(await _run(dsn, name, batches))
    base_wall = statistics.median(w for w, _ in results["unpartitioned"])
    base_cpu = statistics.median(c for _, c in results["unpartitioned"])
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(
            f"{name:22} wall {wall / rows * 1e6:6.2f} us/event ({wall / base_wall - 1:+6.1%})"
            f"  postgres cpu {cpu / rows * 1e6:6.2f} us/event ({cpu / base_cpu - 1:+6.1%})"
        )


def main() -> None:
    """Run the measurement and print one line per layout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1/test")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(_main(args.dsn, args.rows, args.rounds))


if __name__ == "__main__":
    main()
