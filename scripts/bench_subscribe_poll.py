"""What an idle SubscribeEvents tail costs per round: one EventQueries.page after the newest
seq (the horizon statement and an empty index range), over 100,000 stored events of a tenant,
by tenant and by key. Uses a schema of its own in the local `test` database, dropped after.

    .venv/bin/python scripts/bench_subscribe_poll.py
"""

from __future__ import annotations

import asyncio
import time
import uuid

from sqlalchemy import text

from services.storage.queries import EventQueries, Selection
from services.storage.server import create_event_pool
from streammesh.mesh.postgres import create_engine, load_migrations, migrate

URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
_FILL = (
    "INSERT INTO events (tenant, id, key, type, event_time, payload, content_type, attributes,"
    " partition, ingest_time, producer) SELECT 'acme', 'e' || g, 'k' || (g % 100), 't', now(),"
    " '{\"n\":1}', '', '{}', 0, now(), 'p' FROM generate_series(1, 100000) AS g"
)


async def main(rounds: int = 2000) -> None:
    schema = f"bench_subscribe_{uuid.uuid4().hex[:6]}"
    engine = create_engine(URL, schema=schema, application_name="bench-subscribe")
    await migrate(engine, schema=schema, migrations=load_migrations("services.storage.migrations"))
    pool = await create_event_pool(URL, schema=schema, application_name="bench-subscribe", size=2)
    try:
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
    finally:
        await pool.close()
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
