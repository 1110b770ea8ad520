"""Schema migrations (idempotent, safe when replicas start together) and database outages
answered as UNAVAILABLE so the processor retries instead of acknowledging."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from sqlalchemy import text

from services.storage.settings import StorageSettings
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh.postgres import create_engine, load_migrations, migrate
from tests.storage.conftest import Connect, StartServer, queued
from tests.storage.test_storage import store_request

MIGRATIONS = load_migrations("services.storage.migrations")
VERSIONS = [m.version for m in MIGRATIONS]


async def test_migrations_apply_once(database_url: str, pg_schema: str) -> None:
    engine = create_engine(database_url, schema=pg_schema, application_name="storage-tests")
    try:
        assert (
            await migrate(engine, schema=pg_schema, migrations=MIGRATIONS)
            == VERSIONS
            == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
        )
        assert await migrate(engine, schema=pg_schema, migrations=MIGRATIONS) == []
        async with engine.connect() as conn:
            indexes = set(
                (
                    await conn.execute(
                        text("SELECT indexname FROM pg_indexes WHERE schemaname = :s"),
                        {"s": pg_schema},
                    )
                ).scalars()
            )
            collations: dict[str, str] = {
                row[0]: row[1]
                for row in (
                    await conn.execute(
                        text(
                            "SELECT column_name, collation_name FROM information_schema.columns"
                            " WHERE table_schema = :s AND table_name = 'events'"
                            " AND column_name IN ('id', 'key', 'type')"
                        ),
                        {"s": pg_schema},
                    )
                ).all()
            }
        assert collations == {"id": "C", "key": "C", "type": "C"}
        assert {
            "events_tenant_key_seq_idx",
            "events_tenant_type_seq_idx",
            "events_tenant_seq_idx",
        } <= indexes
        assert {
            "dead_letters_tenant_partition_id_idx",
            "dead_letters_tenant_pending_id_idx",
            "event_conflicts_tenant_recorded_idx",
        } <= indexes
    finally:
        await engine.dispose()


async def test_concurrent_migrations_on_a_fresh_schema(database_url: str, pg_schema: str) -> None:
    engines = [
        create_engine(database_url, schema=pg_schema, application_name=f"replica-{n}")
        for n in range(2)
    ]
    try:
        results = await asyncio.gather(
            *(migrate(e, schema=pg_schema, migrations=MIGRATIONS) for e in engines)
        )
        assert sorted(results) == [[], VERSIONS]
        async with engines[0].connect() as conn:
            applied = (await conn.execute(text("SELECT version FROM schema_migrations"))).all()
        assert [row[0] for row in applied] == VERSIONS
    finally:
        for engine in engines:
            await engine.dispose()


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_database_outage_is_unavailable(start_server: StartServer, connect: Connect) -> None:
    engine = create_engine(
        f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/streammesh",
        schema="storage",
        application_name="storage-tests",
    )
    try:
        mesh = await start_server(engine)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await connect(mesh.port, "processor").StoreEvents(store_request([queued()]), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await connect(mesh.port, "gateway").QueryEvents(
                storage_pb2.QueryEventsRequest(), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await engine.dispose()


def test_settings_refuse_a_schema_name_unsafe_for_ddl() -> None:
    with pytest.raises(ValueError, match="db_schema"):
        StorageSettings(db_schema='storage"; DROP TABLE x; --')
    defaults = StorageSettings()
    assert (defaults.port, defaults.db_schema, defaults.max_batch_events) == (
        50055,
        "storage",
        10_000,
    )


async def test_connections_commit_synchronously(database_url: str, pg_schema: str) -> None:
    from sqlalchemy import text

    from streammesh.mesh.postgres import create_engine, create_pool

    engine = create_engine(database_url, schema=pg_schema, application_name="t")
    pool = await create_pool(database_url, schema=pg_schema, application_name="t")
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SHOW synchronous_commit"))).scalar() == "on"
        async with pool.acquire() as raw:
            assert await raw.fetchval("SHOW synchronous_commit") == "on"
            assert await raw.fetchval("SHOW search_path") == pg_schema
    finally:
        await engine.dispose()
        await pool.close()


async def test_a_pool_connection_comes_back_without_an_open_transaction(
    database_url: str, pg_schema: str
) -> None:
    """The pool skips asyncpg's reset query (a round trip per call) but keeps its rollback."""
    from streammesh.mesh.postgres import create_pool

    pool = await create_pool(database_url, schema=pg_schema, application_name="t", size=1)
    try:
        async with pool.acquire() as raw:
            await raw.execute(f'CREATE SCHEMA IF NOT EXISTS "{pg_schema}"')
            await raw.execute("CREATE TABLE left_open (n int)")
            await raw.execute("BEGIN")
            await raw.execute("INSERT INTO left_open VALUES (1)")
        async with pool.acquire() as raw:  # the same connection: the pool holds one
            assert not raw.is_in_transaction()
            assert await raw.fetchval("SELECT count(*) FROM left_open") == 0
            assert await raw.fetchval("SHOW search_path") == pg_schema
    finally:
        await pool.close()
