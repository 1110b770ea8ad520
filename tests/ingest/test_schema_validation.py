"""Ingest's payload checks against a real storage registry (Postgres, mTLS) and real Redis, and
what happens when storage goes away: cached validators keep working, uncached types follow the
tenant's policy (or the fallback setting), nothing is ever INTERNAL, and the change log is
resumed where it was once storage is back."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from services.ingest.registry_client import RegistryClient
from services.ingest.schema_cache import SchemaCache
from services.ingest.server import IngestDeps, schema_cache
from services.ingest.server import create_server as create_ingest
from services.ingest.settings import IngestSettings
from services.storage.server import REGISTRY_SERVICE, StorageDeps, create_event_pool
from services.storage.server import create_server as create_storage
from services.storage.settings import StorageSettings
from streammesh.api.common.v1 import event_pb2
from streammesh.api.common.v1 import schema_registry_pb2 as common
from streammesh.api.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from streammesh.api.storage.v1 import schema_registry_pb2 as pb
from streammesh.api.storage.v1 import schema_registry_pb2_grpc as pb_grpc
from streammesh.mesh import MeshServer, TlsMaterial, create_channel, service_config
from streammesh.mesh.client import TlsFiles
from streammesh.mesh.postgres import create_engine, load_migrations, migrate
from streammesh.mesh.tenancy import tenant_metadata
from streammesh.streams import StreamLayout
from tests.conftest import TRUST_DOMAIN

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "s": {"type": "string"}},
    "required": ["n"],
}


@dataclass
class Rig:
    storage: MeshServer
    storage_settings: StorageSettings
    storage_deps: StorageDeps
    registry: Any
    ingest: Any
    cache: SchemaCache


@pytest.fixture
async def rig(
    pki_dir: Path, database_url: str, pg_schema: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[Rig]:
    engine = create_engine(database_url, schema=pg_schema, application_name="ingest-tests")
    await migrate(
        engine, schema=pg_schema, migrations=load_migrations("services.storage.migrations")
    )
    pool = await create_event_pool(database_url, schema=pg_schema, application_name="ingest-tests")
    storage_settings = StorageSettings(
        tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, port=0, db_schema=pg_schema
    )
    deps = StorageDeps(engine=engine, pool=pool)
    storage = create_storage(storage_settings, deps)
    await storage.start()
    redis_client = aioredis.Redis.from_url(redis_url)
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=2)
    await layout.ensure_group(redis_client)
    settings = IngestSettings(
        port=0,
        tls_dir=pki_dir,
        trust_domain=TRUST_DOMAIN,
        partitions=2,
        storage_target=f"127.0.0.1:{storage.port}",
        schema_poll_ms=100,
    )
    client = RegistryClient(
        settings.storage_target, TlsFiles.of(pki_dir, "ingest"), timeout_seconds=1.0
    )
    cache = schema_cache(settings, client)
    await cache.poll_once()  # first contact (which empties the cache) before any lookup
    cache.start()
    ingest = create_ingest(settings, IngestDeps(redis_client, layout, schemas=cache))
    await ingest.start()
    registry_channel = create_channel(
        f"127.0.0.1:{storage.port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="storage",
        config=service_config(REGISTRY_SERVICE, health_checked=False),
    )
    ingest_channel = create_channel(
        f"127.0.0.1:{ingest.port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="ingest",
        config=service_config("streammesh.ingest.v1.IngestService", health_checked=False),
    )
    rig = Rig(
        storage,
        storage_settings.model_copy(update={"port": storage.port}),
        deps,
        pb_grpc.SchemaRegistryServiceStub(registry_channel),
        ingest_pb2_grpc.IngestServiceStub(ingest_channel),
        cache,
    )
    yield rig
    await ingest_channel.close()
    await registry_channel.close()
    await ingest.stop(0)
    await cache.stop()
    await client.close()
    await rig.storage.stop(0)
    await redis_client.aclose()
    await pool.close()
    await engine.dispose()


async def register(rig: Rig, event_type: str, schema: Any = SCHEMA) -> None:
    await rig.registry.RegisterSchema(
        pb.RegisterSchemaRequest(
            tenant="t1", event_type=event_type, schema_json=json.dumps(schema)
        ),
        timeout=10,
        wait_for_ready=True,  # the test's channel may be backing off after a storage restart
    )


async def publish(rig: Rig, *events: event_pb2.Event) -> ingest_pb2.PublishBatchResponse:
    reply: ingest_pb2.PublishBatchResponse = await rig.ingest.PublishBatch(
        ingest_pb2.PublishBatchRequest(events=events, producer="p"),
        timeout=10,
        metadata=tenant_metadata("t1"),  # as the gateway names its caller's tenant
    )
    return reply


def event(event_type: str, payload: Any, **fields: Any) -> event_pb2.Event:
    return event_pb2.Event(key="k", type=event_type, payload=json.dumps(payload).encode(), **fields)


def reasons(reply: ingest_pb2.PublishBatchResponse) -> list[tuple[int, str]]:
    return [(r.index, r.reason) for r in reply.refused]


async def test_cached_validators_keep_working_while_storage_is_down(rig: Rig) -> None:
    await register(rig, "known")
    assert reasons(await publish(rig, event("known", {"n": 1}), event("known", {"n": "x"}))) == [
        (1, "SCHEMA_VIOLATION")
    ]
    # Version 2 replaces version 1 in the cache (the poller reloads what was in use).
    v2 = {**SCHEMA, "properties": {**SCHEMA["properties"], "t": {"type": "boolean"}}}
    await register(rig, "known", v2)
    registered = time.monotonic()
    while not (await publish(rig, event("known", {"n": 1, "t": "x"}))).refused:
        assert time.monotonic() - registered < 10, "version 2 never arrived"
        await asyncio.sleep(0.02)
    await rig.storage.stop(0)
    # Known type: still checked from the cache. Unknown type, policy ACCEPT (the fallback, as
    # the tenant's policy was never read): accepted unchecked. A version the cache does not
    # hold cannot be checked: refused as unavailable (resend later); one above the latest the
    # cache knows is unknown. Nothing is INTERNAL.
    reply = await publish(
        rig,
        event("known", {"n": 2}),
        event("known", {"s": "no n"}),
        event("never.seen", {"anything": True}),
        event("known", {"n": 3}, schema_version=1),
        event("known", {"n": 3}, schema_version=3),
    )
    assert reasons(reply) == [
        (1, "SCHEMA_VIOLATION"),
        (3, "SCHEMA_UNAVAILABLE"),
        (4, "SCHEMA_VERSION_UNKNOWN"),
    ]
    assert reply.accepted == 2


async def test_a_refusing_tenant_refuses_uncached_types_while_storage_is_down(rig: Rig) -> None:
    await rig.registry.SetSchemaPolicy(
        pb.SetSchemaPolicyRequest(tenant="t1", unknown_types=common.UNKNOWN_TYPE_POLICY_REFUSE),
        timeout=10,
    )
    assert reasons(await publish(rig, event("nothing", {}))) == [(0, "SCHEMA_MISSING")]
    await register(rig, "known")
    await rig.storage.stop(0)
    reply = await publish(rig, event("other", {}), event("nothing", {}))
    # "nothing" is cached as having no schema (refused as missing); "other" was never looked
    # up and cannot be now.
    assert reasons(reply) == [(0, "SCHEMA_UNAVAILABLE"), (1, "SCHEMA_MISSING")]
    assert reply.accepted == 0


async def test_the_change_log_resumes_after_a_storage_restart(rig: Rig) -> None:
    open_v1 = {"type": "object", "properties": {"a": {"type": "number"}}}
    await register(rig, "evolving", open_v1)
    probe = event("evolving", {"a": 1, "b": 5})
    assert (await publish(rig, probe)).accepted == 1
    port = rig.storage.port
    await rig.storage.stop(0)
    await asyncio.sleep(0.3)  # a few failed polls: the cursor stays
    rig.storage = create_storage(
        rig.storage_settings.model_copy(update={"port": port}), rig.storage_deps
    )
    await rig.storage.start()
    v2 = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "string"}}}
    await register(rig, "evolving", v2)
    registered = time.monotonic()
    while not (await publish(rig, probe)).refused:
        assert time.monotonic() - registered < 10, "the new version never arrived"
        await asyncio.sleep(0.02)
    print(f"\nv2 in use {time.monotonic() - registered:.3f} s after registering (after a restart)")


async def test_non_json_and_unnamed_types_are_untouched_without_a_registry(rig: Rig) -> None:
    reply = await publish(
        rig,
        event_pb2.Event(key="k", type="bin", payload=b"\x00\x01", content_type="image/png"),
        event("plain", {"x": 1}),
    )
    assert reply.accepted == 2 and not reply.refused


async def test_an_envelope_error_still_refuses_the_whole_batch(rig: Rig) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await publish(rig, event("known", {"n": 1}), event_pb2.Event(type="t"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
