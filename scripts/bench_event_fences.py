"""What the lease fence (services/storage/event_fences.py, migration 0016) costs storage's
insert: `--rows` new rows through EventStore.insert_batch in batches of each `--batch` size,
unfenced (one autocommitted statement, as before) and fenced by one partition's epoch (BEGIN,
the fence upsert, the insert, COMMIT), into a fresh migrated schema, interleaved over
`--rounds` rounds; prints the median wall time per batch and per event of each.

    .venv/bin/python -m scripts.bench_event_fences --dsn postgresql://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from sqlalchemy import text

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


async def _round(store: EventStore, size: int, rows: int, fenced: bool) -> float:
    batches = [_batch(size, i * size) for i in range(max(1, rows // size))]
    fences = [Fence("bench:events", 0, 1)] if fenced else []
    started = time.perf_counter()
    for batch in batches:
        await store.insert_batch(batch, partition=0, fences=fences)
    return (time.perf_counter() - started) / len(batches)


async def main_async(dsn: str, rows: int, sizes: list[int], rounds: int) -> None:
    schema = f"bench_fences_{uuid.uuid4().hex[:8]}"
    engine = create_engine(dsn, schema=schema, application_name="bench-fences")
    await migrate(engine, schema=schema, migrations=load_migrations("services.storage.migrations"))
    pool = await create_pool(
        dsn, schema=schema, application_name="bench-fences", size=2, init=use_integer_timestamps
    )
    try:
        store = EventStore(pool)
        await _round(store, 100, 1000, True)  # warm-up (plans, the fence row)
        print(f"{'batch':>6} {'unfenced us/batch':>18} {'fenced us/batch':>16} {'+us/event':>10}")
        for size in sizes:
            plain: list[float] = []
            fenced: list[float] = []
            for _ in range(rounds):
                plain.append(await _round(store, size, rows, False))
                fenced.append(await _round(store, size, rows, True))
            a, b = statistics.median(plain) * 1e6, statistics.median(fenced) * 1e6
            print(f"{size:>6} {a:>18.0f} {b:>16.0f} {(b - a) / size:>10.2f}")
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
