"""What an idle SubscribeEvents tail costs per round: one EventQueries.page after the newest
seq (the horizon statement and an empty index range), over 100,000 stored events of a tenant,
by tenant and by key. Uses a schema of its own in the local `test` database, dropped after.

    .venv/bin/python scripts/bench_subscribe_poll.py
"""

from __future__ import annotations

import asyncio
import time

from storage_bench_schema import storage_bench_schema

from services.storage.queries import EventQueries, Selection

_FILL = (
    "INSERT INTO events (tenant, id, key, type, event_time, payload, content_type, attributes,"
    " partition, ingest_time, producer) SELECT 'acme', 'e' || g, 'k' || (g % 100), 't', now(),"
    " '{\"n\":1}', '', '{}', 0, now(), 'p' FROM generate_series(1, 100000) AS g"
)


async def main(rounds: int = 2000) -> None:
    async with storage_bench_schema("subscribe") as (_, pool):
        async with pool.acquire() as conn:
            await conn.execute(_FILL)
            await conn.execute("ANALYZE events")
            top = await conn.fetchval("SELECT max(seq) FROM events")
        queries = EventQueries(pool)
        for name, selection in (
            ("by tenant", Selection(tenant="acme")),
            ("by key", Selection(tenant="acme", keys=("k7",))),
        ):
            for _ in range(50):  # warm the pool's prepared statements
                await queries.page(selection, after_seq=top, limit=500)
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(rounds):
                await queries.page(selection, after_seq=top, limit=500)
            wall = (time.perf_counter() - wall) / rounds
            cpu = (time.process_time() - cpu) / rounds
            print(f"{name}: idle round {wall * 1e3:.3f} ms wall, {cpu * 1e3:.3f} ms storage CPU")


if __name__ == "__main__":
    asyncio.run(main())
