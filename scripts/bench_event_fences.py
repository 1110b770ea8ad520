"""What the lease fence (services/storage/event_fences.py, migration 0016) costs storage's
insert: `--rows` new rows through EventStore.insert_batch in batches of each `--batch` size,
unfenced (one autocommitted statement, as before) and fenced by one partition's epoch (BEGIN,
the fence upsert, the insert, COMMIT), into a fresh migrated schema, interleaved over
`--rounds` rounds; prints the median wall time per batch, and the Postgres backend's CPU per
event (from /proc: run it on the database's host), of each.

    .venv/bin/python -m scripts.bench_event_fences --dsn postgresql://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from sqlalchemy import text

from scripts.bench_payload_json import _cpu_seconds
from services.storage.event_fences import Fence
from services.storage.store import BatchColumns, EventStore
from services.storage.times import use_integer_timestamps
from streammesh.mesh.postgres import create_engine, create_pool, load_migrations, migrate

__all__ = ["main"]

_BASE = 820_000_000_000_000  # 2026, as Postgres microseconds


def _batch(size: int, offset: int) -> BatchColumns:
    columns = BatchColumns.empty()
    for n in range(size):
        columns.append(
            id=uuid.uuid4().hex,
            key=f"k{n % 500}",
            type="order.created",
            event_time=(_BASE + (offset + n) * 1000, 0),
            payload=b'{"amount":1,"currency":"EUR"}',
            content_type="application/json",
            attributes="{}",
            ingest_time=_BASE + (offset + n) * 1000,
            producer="bench",
            tenant="default",
        )
    return columns


async def _round(
    store: EventStore, backend: int, size: int, rows: int, fenced: bool
) -> tuple[float, float]:
    """Wall seconds per batch, backend CPU seconds per event."""
    batches = [_batch(size, i * size) for i in range(max(1, rows // size))]
    fences = [Fence("bench:events", 0, 1)] if fenced else []
    cpu = _cpu_seconds(backend)
    started = time.perf_counter()
    for batch in batches:
        await store.insert_batch(batch, partition=0, fences=fences)
    wall = time.perf_counter() - started
    return wall / len(batches), (_cpu_seconds(backend) - cpu) / (len(batches) * size)


async def main_async(dsn: str, rows: int, sizes: list[int], rounds: int) -> None:
    schema = f"bench_fences_{uuid.uuid4().hex[:8]}"
    engine = create_engine(dsn, schema=schema, application_name="bench-fences")
    await migrate(engine, schema=schema, migrations=load_migrations("services.storage.migrations"))
    pool = await create_pool(
        dsn, schema=schema, application_name="bench-fences", size=1, init=use_integer_timestamps
    )
    try:
        store = EventStore(pool)
        async with pool.acquire() as conn:
            backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        await _round(store, backend, 100, 1000, True)  # warm-up (plans, the fence row)
        print(
            f"{'batch':>6} {'wall us/batch':>14} {'fenced':>8} "
            f"{'backend CPU us/event':>21} {'fenced':>8}"
        )
        for size in sizes:
            plain: list[tuple[float, float]] = []
            fenced: list[tuple[float, float]] = []
            for _ in range(rounds):
                plain.append(await _round(store, backend, size, rows, False))
                fenced.append(await _round(store, backend, size, rows, True))
            wall = [statistics.median(r[0] for r in runs) * 1e6 for runs in (plain, fenced)]
            cpu = [statistics.median(r[1] for r in runs) * 1e6 for runs in (plain, fenced)]
            print(f"{size:>6} {wall[0]:>14.0f} {wall[1]:>8.0f} {cpu[0]:>21.1f} {cpu[1]:>8.1f}")
    finally:
        await pool.close()
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1/test")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, action="append", default=[])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main_async(args.dsn, args.rows, args.batch or [10, 100, 2000], args.rounds))


if __name__ == "__main__":
    main()
