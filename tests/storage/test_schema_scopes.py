"""The per-replica cache of filter scopes (services/storage/schema_scopes.py) on real Postgres
and mTLS: a schema registered on one storage replica is seen by the next query on another
(whose cache held the type's scope), and the cache reads the registry's tables only when the
change log names the tenant."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.schema_scopes import SchemaScopes
from services.storage.server import REGISTRY_SERVICE
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import schema_registry_pb2 as pb
from streammesh.api.storage.v1 import schema_registry_pb2_grpc as pb_grpc
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh import TlsMaterial, create_channel, service_config
from streammesh.mesh.postgres import create_pool
from tests.storage.conftest import Connect, StartServer, schema_connection
from tests.storage.test_schema_registry import ORDER_V1, Registry, with_property

ORDER = event_pb2.EventFilter(types=["order.created"])


async def query(stub: Any, expression: str) -> grpc.StatusCode:
    """The status of a QueryEvents of tenant t1's orders under `expression`."""
    request = storage_pb2.QueryEventsRequest(
        tenant="t1", filter=ORDER, filter_expression=expression
    )
    try:
        await stub.QueryEvents(request, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_a_schema_registered_on_one_replica_is_seen_by_the_next_query_on_another(
    start_server: StartServer, engine: AsyncEngine, connect: Connect, pki_dir: Path
) -> None:
    writer, reader = await start_server(engine), await start_server(engine)
    channel = create_channel(
        f"127.0.0.1:{writer.port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="storage",
        config=service_config(REGISTRY_SERVICE, health_checked=False),
    )
    registry = cast(Registry, pb_grpc.SchemaRegistryServiceStub(channel))
    queries = connect(reader.port, "gateway")
    region = 'payload.region = "eu"'
    try:
        # No schema: any field goes (typed by its literal); the reader caches that scope.
        assert await query(queries, region) == grpc.StatusCode.OK
        assert await query(queries, region) == grpc.StatusCode.OK
        await registry.RegisterSchema(
            pb.RegisterSchemaRequest(
                tenant="t1", event_type="order.created", schema_json=json.dumps(ORDER_V1)
            )
        )
        # The very next query: order.created now declares amount and id only.
        assert await query(queries, region) == grpc.StatusCode.INVALID_ARGUMENT
        assert await query(queries, 'payload.amount = "x"') == grpc.StatusCode.INVALID_ARGUMENT
        assert await query(queries, "payload.amount > 1") == grpc.StatusCode.OK
        v2 = with_property(ORDER_V1, "region", {"type": "string"})
        await registry.RegisterSchema(
            pb.RegisterSchemaRequest(
                tenant="t1", event_type="order.created", schema_json=json.dumps(v2)
            )
        )
        assert await query(queries, region) == grpc.StatusCode.OK
    finally:
        await channel.close()


async def _register(conn: Any, tenant: str, event_type: str, schema: dict[str, Any]) -> None:
    """A version as the registry writes one, change log row included (the registry's tests
    cover its own writes)."""
    async with conn.transaction():
        version = await conn.fetchval(
            "INSERT INTO schema_subjects (tenant, event_type, latest_version) VALUES ($1, $2, 1)"
            " ON CONFLICT (tenant, event_type) DO UPDATE"
            " SET latest_version = schema_subjects.latest_version + 1, updated_at = now()"
            " RETURNING latest_version",
            tenant,
            event_type,
        )
        await conn.execute(
            "INSERT INTO schema_versions (tenant, event_type, version, schema_text, fingerprint)"
            " VALUES ($1, $2, $3, $4, $5)",
            tenant,
            event_type,
            version,
            json.dumps(schema),
            uuid.uuid4().hex,
        )
        await conn.execute("LOCK TABLE schema_changes IN EXCLUSIVE MODE")
        await conn.execute(
            "INSERT INTO schema_changes (tenant, event_type) VALUES ($1, $2)", tenant, event_type
        )


@pytest.fixture
async def pool(engine: AsyncEngine, database_url: str, pg_schema: str) -> AsyncIterator[Any]:
    pool = await create_pool(database_url, schema=pg_schema, application_name="t", size=2)
    yield pool
    await pool.close()


async def test_the_registry_is_read_only_for_tenants_the_change_log_names(
    pool: asyncpg.Pool, database_url: str, pg_schema: str
) -> None:
    scopes = SchemaScopes(pool)
    async with schema_connection(database_url, pg_schema) as conn:
        await _register(conn, "acme", "order", ORDER_V1)
        first = await scopes.scope("acme", ["order"])
        assert first.declarations("amount") == {"order": "number"}
        assert await scopes.scope("acme", ["order"]) is first  # cached
        everything = await scopes.scope("acme", [])
        assert scopes.loads == 2
        await _register(conn, "globex", "order", ORDER_V1)  # another tenant's change
        assert await scopes.scope("acme", ["order"]) is first
        assert scopes.loads == 2
        await _register(conn, "acme", "refund", ORDER_V1)
        assert await scopes.scope("acme", ["order"]) is not first
        fresh = await scopes.scope("acme", [])
        assert fresh is not everything and sorted(fresh.schemas) == ["order", "refund"]
        assert scopes.loads == 4
        # The change log reset (its head behind the cursor): everything is read again.
        await conn.execute("TRUNCATE schema_changes RESTART IDENTITY")
        await scopes.scope("globex", ["order"])
        assert await scopes.scope("acme", []) is not fresh
        assert scopes.loads == 6
