"""What the schema scope of a filtered query costs (EventQueries.scope: the payload fields a
filter may name, from the latest schema of each type in scope), per query, for a tenant with
50 registered types of 10 properties each: one type named, and none named (all 50 in scope),
read as every query read it before the cache (a read-only transaction under the query
settings, the join, a parse of each schema) and through the cache (services/storage/
schema_scopes.py: the change log's head, then a dict); and a whole filtered page (scope,
filter check, page) beside it. Uses a schema of its own in
the local `test` database, dropped after. Prints wall and storage-process CPU per query.

    .venv/bin/python scripts/bench_query_scope.py
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
from storage_bench_schema import storage_bench_schema

from services.storage.filters import FieldScope, payload_fields
from services.storage.filters.check import check_filter
from services.storage.filters.syntax import parse_filter
from services.storage.queries import SESSION_SETTINGS, EventQueries, Selection
from services.storage.schema_scopes import MAX_SCHEMAS, SCOPE_SQL

TYPES = 50
_SCHEMA = {
    "type": "object",
    "properties": {f"field{n}": {"type": "number" if n % 2 else "string"} for n in range(10)},
}
_FILL = (
    "INSERT INTO events (tenant, id, key, type, event_time, payload, content_type, attributes,"
    " partition, ingest_time, producer) SELECT 'acme', 'e' || g, 'k' || (g % 100), 't0', now(),"
    " '{\"field1\":1}', '', '{}', 0, now(), 'p' FROM generate_series(1, 10000) AS g"
)


async def _register(conn: object, tenant: str) -> None:
    for n in range(TYPES):
        await conn.execute(  # type: ignore[attr-defined]
            "INSERT INTO schema_subjects (tenant, event_type, latest_version) VALUES ($1, $2, 1)",
            tenant,
            f"t{n}",
        )
        await conn.execute(  # type: ignore[attr-defined]
            "INSERT INTO schema_versions (tenant, event_type, version, schema_text, fingerprint)"
            " VALUES ($1, $2, 1, $3, $4)",
            tenant,
            f"t{n}",
            json.dumps(_SCHEMA),
            uuid.uuid4().hex,
        )
        await conn.execute(  # type: ignore[attr-defined]
            "INSERT INTO schema_changes (tenant, event_type) VALUES ($1, $2)", tenant, f"t{n}"
        )


async def _time(name: str, call: Callable[[], Awaitable[object]], rounds: int) -> None:
    for _ in range(50):  # warm the pool's prepared statements (and the cache, if any)
        await call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(rounds):
        await call()
    wall = (time.perf_counter() - wall) / rounds
    cpu = (time.process_time() - cpu) / rounds
    print(f"{name}: {wall * 1e6:.0f} us wall, {cpu * 1e6:.0f} us storage CPU per query")


async def uncached_scope(pool: asyncpg.Pool, tenant: str, types: list[str]) -> FieldScope:
    """The scope as each query read it before the cache."""
    async with pool.acquire() as conn, conn.transaction(isolation="read_committed", readonly=True):
        await conn.fetch(SESSION_SETTINGS, "5000")
        rows = await conn.fetch(SCOPE_SQL, tenant, types or None, MAX_SCHEMAS)
    schemas = {row[0]: payload_fields(json.loads(row[1])) for row in rows}
    return FieldScope(schemas, allow_undeclared=not types)


async def main(rounds: int = 2000) -> None:
    async with storage_bench_schema("scope") as (_, pool):
        async with pool.acquire() as conn:
            await _register(conn, "acme")
            await conn.execute(_FILL)
            await conn.execute("ANALYZE")
        queries = EventQueries(pool)
        node = parse_filter("payload.field1 >= 1")

        async def filtered_page() -> None:
            scope = await queries.scope("acme", ["t0"])
            predicate = check_filter(node, scope) if node is not None else None
            selection = Selection(tenant="acme", types=("t0",), predicate=predicate)
            await queries.page(selection, after_seq=0, limit=100)

        for name, types in (("one type named", ["t0"]), (f"no type named ({TYPES})", [])):
            await _time(
                f"scope, {name}, uncached", lambda t=types: uncached_scope(pool, "acme", t), rounds
            )
            await _time(f"scope, {name}, cached", lambda t=types: queries.scope("acme", t), rounds)
        await _time("filtered page of 100 (scope + check + page)", filtered_page, rounds // 4)


if __name__ == "__main__":
    asyncio.run(main())
