"""A migrated storage schema of its own in the local `test` database for a benchmark script:
its engine and storage's event pool, the schema dropped afterwards."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.server import create_event_pool
from streammesh.mesh.postgres import create_engine, load_migrations, migrate

URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@contextlib.asynccontextmanager
async def storage_bench_schema(name: str) -> AsyncIterator[tuple[AsyncEngine, asyncpg.Pool]]:
    """A schema `bench_<name>_<random>`, migrated; its engine and a pool of two connections."""
    schema = f"bench_{name}_{uuid.uuid4().hex[:6]}"
    engine = create_engine(URL, schema=schema, application_name=f"bench-{name}")
    await migrate(engine, schema=schema, migrations=load_migrations("services.storage.migrations"))
    pool = await create_event_pool(URL, schema=schema, application_name=f"bench-{name}", size=2)
    try:
        yield engine, pool
    finally:
        await pool.close()
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await engine.dispose()
