"""Wiring of the storage service: dependencies, server, and the process entry point."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.dead_letter_store import DeadLetterStore
from services.storage.definition_service import DefinitionServicer
from services.storage.definition_store import DefinitionStore
from services.storage.engine_output_store import EngineOutputStore
from services.storage.live_feed import BufferLimits, BufferMetrics
from services.storage.output_listings import OutputListings
from services.storage.output_queries import OutputQueries
from services.storage.output_subscriptions import OutputSubscriptions
from services.storage.partitions import run_maintenance
from services.storage.queries import EventQueries, QueryBounds
from services.storage.query_api import QueryApi, page_tokens
from services.storage.registry_service import SchemaRegistryServicer
from services.storage.registry_store import RegistryStore
from services.storage.service import Limits, StorageServicer
from services.storage.settings import StorageSettings
from services.storage.sql import MIGRATIONS_PACKAGE, use_integer_timestamps
from services.storage.store import EventStore
from services.storage.subscription_leases import SubscriptionLeases
from services.storage.subscriptions import EventSubscriptions, TailAdmissions, TailSettings
from services.storage.table_watch import TableWatch
from streammesh.api.storage.v1 import (
    definitions_pb2,
    definitions_pb2_grpc,
    schema_registry_pb2,
    schema_registry_pb2_grpc,
    storage_pb2,
    storage_pb2_grpc,
)
from streammesh.mesh import (
    MeshServer,
    PeerPolicy,
    ServiceBinding,
    create_mesh_server,
    run_until_signalled,
)
from streammesh.mesh.health import postgres_check
from streammesh.mesh.metrics import ServiceMetrics
from streammesh.mesh.metrics.pipeline import StorageMetrics
from streammesh.mesh.postgres import create_engine, create_pool, load_migrations, migrate
from streammesh.mesh.startup import reaching, run_service

__all__ = [
    "DEFINITION_SERVICE",
    "REGISTRY_SERVICE",
    "SERVICE",
    "StorageDeps",
    "create_event_pool",
    "create_server",
    "main",
    "serve",
]

SERVICE = "streammesh.storage.v1.StorageService"
REGISTRY_SERVICE = "streammesh.storage.v1.SchemaRegistryService"
DEFINITION_SERVICE = "streammesh.storage.v1.DefinitionService"


@dataclass(frozen=True)
class StorageDeps:
    """What the server needs from outside, bound to the storage schema (migrated): an engine
    for dead letters, and the asyncpg pool for the events (`create_event_pool`)."""

    engine: AsyncEngine
    pool: asyncpg.Pool


async def create_event_pool(
    database_url: str, *, schema: str, application_name: str, size: int = 10
) -> asyncpg.Pool:
    """The pool EventStore needs: storage's session settings, timestamps as integers."""
    return await create_pool(
        database_url,
        schema=schema,
        application_name=application_name,
        size=size,
        init=use_integer_timestamps,
    )


def create_server(settings: StorageSettings, deps: StorageDeps) -> MeshServer:
    """Build, not start, the storage server; `settings.port` 0 binds a free port."""
    limits = Limits(
        max_batch_events=settings.max_batch_events,
        max_text_chars=settings.max_text_chars,
        max_filter_keys=settings.max_filter_keys,
        # Leave room for the response envelope and the next_page_token.
        max_response_bytes=settings.max_message_bytes * 9 // 10,
    )
    metrics = ServiceMetrics("storage")
    queries = EventQueries(
        deps.pool,
        QueryBounds(
            statement_timeout_ms=settings.query_timeout_ms, max_rows=settings.query_max_rows
        ),
    )
    tokens = page_tokens(
        settings.page_token_secret_file, max_age_seconds=settings.page_token_max_age_seconds
    )
    query_api = QueryApi(queries, tokens, limits, trust_domain=settings.trust_domain)
    tails = TailSettings(
        poll_seconds=settings.subscribe_poll_seconds,
        heartbeat_seconds=settings.subscribe_heartbeat_seconds,
        message_bytes=limits.max_response_bytes,
        max_per_principal=settings.subscribe_max_per_principal,
        max_per_replica=settings.subscribe_max_per_replica,
        buffer=BufferLimits(
            items=settings.subscribe_buffer_items, bytes=settings.subscribe_buffer_bytes
        ),
        shared_feeds=settings.subscribe_shared_feeds,
    )
    # One count for both kinds of tail: the limits are on subscriptions, whatever they follow.
    admissions = TailAdmissions(
        tails,
        metrics.registry,
        SubscriptionLeases(deps.pool, ttl_seconds=settings.subscribe_lease_seconds),
    )
    watch = TableWatch(deps.pool, schema=settings.db_schema, poll_seconds=tails.poll_seconds)
    buffers = BufferMetrics(metrics.registry)
    binding = ServiceBinding(
        storage_pb2.DESCRIPTOR.services_by_name["StorageService"],
        storage_pb2_grpc.add_StorageServiceServicer_to_server,
        StorageServicer(
            EventStore(deps.pool, committed=lambda tenants: watch.changed("events", tenants)),
            limits,
            DeadLetterStore(deps.engine),
            query_api,
            trust_domain=settings.trust_domain,
            metrics=StorageMetrics(metrics.registry),
            subscriptions=EventSubscriptions(query_api, admissions, watch, buffers),
        ),
    )
    registry = ServiceBinding(
        schema_registry_pb2.DESCRIPTOR.services_by_name["SchemaRegistryService"],
        schema_registry_pb2_grpc.add_SchemaRegistryServiceServicer_to_server,
        SchemaRegistryServicer(RegistryStore(deps.engine)),
    )
    rules = ServiceBinding(
        definitions_pb2.DESCRIPTOR.services_by_name["DefinitionService"],
        definitions_pb2_grpc.add_DefinitionServiceServicer_to_server,
        DefinitionServicer(
            DefinitionStore(deps.engine),
            EngineOutputStore(deps.engine, committed=watch.changed),
            OutputSubscriptions(deps.engine, admissions, watch, buffers),
            OutputListings(
                OutputQueries(queries), tokens, max_response_bytes=limits.max_response_bytes
            ),
        ),
    )
    return create_mesh_server(
        settings,
        identity="storage",
        bindings=[binding, registry, rules],
        # Who may call what: the `storage` table of the policy file (streammesh/mesh/policy.toml).
        guard=PeerPolicy.load(settings, "storage"),
        metrics=metrics,
    )


async def serve(settings: StorageSettings) -> None:
    """Migrate the schema, then serve until SIGTERM/SIGINT; the pool closes after the drain."""
    engine = create_engine(
        settings.database_url,
        schema=settings.db_schema,
        application_name="streammesh-storage",
        pool_size=settings.pool_size,
    )
    pool: asyncpg.Pool | None = None
    maintenance: asyncio.Task[None] | None = None

    async def close() -> None:
        if maintenance is not None:  # before the pool it uses closes
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance
        await engine.dispose()
        if pool is not None:
            await pool.close()

    try:
        with reaching("Postgres", settings.database_url):
            await migrate(
                engine,
                schema=settings.db_schema,
                migrations=load_migrations(MIGRATIONS_PACKAGE),
            )
            pool = await create_event_pool(
                settings.database_url,
                schema=settings.db_schema,
                application_name="streammesh-storage",
                size=settings.pool_size,
            )
        mesh = create_server(settings, StorageDeps(engine=engine, pool=pool))
        # Without Postgres no storage RPC can succeed: NOT_SERVING moves clients elsewhere.
        mesh.watch_dependencies(postgres_check(settings.database_url))
        # Every replica runs it; the advisory lock inside lets one pass run at a time.
        maintenance = asyncio.create_task(
            run_maintenance(
                pool,
                settings.partition_policy(),
                interval_seconds=settings.partition_maintenance_seconds,
            )
        )
        await run_until_signalled(mesh, grace=settings.grace_seconds, on_stop=close)
    except BaseException:
        # Startup failed (database down, port taken): close the pools before the error ends us.
        await close()
        raise


def main() -> None:
    """Entry point of `python -m services.storage`."""
    run_service("storage", StorageSettings, serve)
