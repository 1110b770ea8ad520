"""Ingest wiring: settings -> Redis client (durability checked) -> back-pressure sampler ->
servicer -> mesh server."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.ingest.idempotency import IdempotencyWindow
from services.ingest.pressure import BackPressure, PressureLimits
from services.ingest.queue import StreamAppender, check_durability
from services.ingest.registry_client import RegistryClient
from services.ingest.schema_cache import SchemaCache
from services.ingest.service import IngestServicer
from services.ingest.settings import IngestSettings
from services.ingest.validation import BatchLimits
from streammesh.api.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from streammesh.envelope import EnvelopeLimits
from streammesh.legacy_keys import move_legacy_keys
from streammesh.mesh import (
    MeshServer,
    PeerPolicy,
    ServiceBinding,
    create_mesh_server,
    run_until_signalled,
)
from streammesh.mesh.client import TlsFiles
from streammesh.mesh.health import redis_check
from streammesh.mesh.metrics import ServiceMetrics
from streammesh.mesh.metrics.pipeline import IngestMetrics, QueueBacklogCollector
from streammesh.mesh.redis_client import connect_redis
from streammesh.mesh.startup import reaching, run_service
from streammesh.streams import StreamLayout

__all__ = [
    "IngestDeps",
    "create_server",
    "layout_from",
    "main",
    "pressure_limits",
    "schema_cache",
    "serve",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestDeps:
    redis: aioredis.Redis
    layout: StreamLayout
    pressure: BackPressure | None = None
    """Back-pressure sampler (started by its owner); None accepts without limits."""
    schemas: SchemaCache | None = None
    """Payload validators (started by their owner); None checks no payload schema."""


def layout_from(settings: IngestSettings) -> StreamLayout:
    return StreamLayout(
        prefix=settings.stream_prefix, partitions=settings.partitions, group=settings.group
    )


def pressure_limits(settings: IngestSettings) -> PressureLimits:
    return PressureLimits(
        max_events=settings.max_unacked_events,
        max_bytes=settings.max_unacked_bytes,
        max_partition_events=settings.max_partition_unacked_events,
        max_partition_bytes=settings.max_partition_unacked_bytes,
        max_memory_bytes=settings.max_redis_memory_bytes,
        memory_fraction=settings.redis_memory_fraction,
        sample_interval_seconds=settings.pressure_sample_ms / 1000,
        stale_after_seconds=max(5.0, 10 * settings.pressure_sample_ms / 1000),
        retry_after_seconds=settings.retry_after_seconds,
    )


def create_server(settings: IngestSettings, deps: IngestDeps) -> MeshServer:
    limits = BatchLimits(
        max_batch_events=settings.max_batch_events,
        envelope=EnvelopeLimits(max_payload_bytes=settings.max_payload_bytes),
    )
    window = settings.idempotency_window_seconds
    appender = StreamAppender(
        deps.redis,
        deps.layout,
        deps.pressure,
        max_entry_bytes=settings.max_entry_bytes,
        window=IdempotencyWindow(window, settings.idempotency_max_ids) if window else None,
    )
    metrics = ServiceMetrics("ingest")
    if deps.pressure is not None:
        metrics.registry.register(QueueBacklogCollector(deps.pressure, deps.layout.partitions))
    servicer = IngestServicer(
        appender,
        limits,
        deps.schemas,
        trust_domain=settings.trust_domain,
        metrics=IngestMetrics(metrics.registry),
    )
    return create_mesh_server(
        settings,
        identity="ingest",
        bindings=[
            ServiceBinding(
                ingest_pb2.DESCRIPTOR.services_by_name["IngestService"],
                ingest_pb2_grpc.add_IngestServiceServicer_to_server,
                servicer,
            )
        ],
        # Who may call what: the `ingest` table of the policy file (streammesh/mesh/policy.toml).
        guard=PeerPolicy.load(settings, "ingest"),
        metrics=metrics,
    )


def schema_cache(settings: IngestSettings, registry: RegistryClient) -> SchemaCache:
    return SchemaCache(
        registry,
        poll_interval=settings.schema_poll_ms / 1000,
        max_subjects=settings.schema_cache_subjects,
        refuse_unknown_when_unreachable=settings.unknown_types_when_unreachable == "refuse",
    )


async def serve(settings: IngestSettings) -> None:
    client = connect_redis(settings.redis_url, timeout_seconds=settings.redis_timeout_seconds)
    layout = layout_from(settings)
    try:
        with reaching("Redis", settings.redis_url):
            mode = await check_durability(client, require_aof=settings.require_aof)
            moved = await move_legacy_keys(client, layout)
            await layout.ensure_group(client)
    except BaseException:
        await client.aclose()
        raise
    log.info("Redis persistence: %s", mode)
    if moved:
        log.warning("moved %d partition keys to the hash-tagged layout", moved)
    limits = pressure_limits(settings)
    log.info("back-pressure: %s", limits.describe())
    pressure = BackPressure(client, layout, limits)
    await pressure.sample()
    pressure.start()

    # Storage is not needed to start: without it, cached and unknown types follow the outage
    # rules of the schema cache, and the cache catches up once storage answers.
    registry = schemas = None
    if settings.validate_payloads:
        registry = RegistryClient(
            settings.storage_target,
            TlsFiles.of(settings.tls_dir, "ingest"),
            timeout_seconds=settings.registry_timeout_seconds,
            tls_reload_seconds=settings.tls_reload_seconds,
        )
        schemas = schema_cache(settings, registry)
        schemas.start()

    async def stop() -> None:
        if schemas is not None and registry is not None:
            await schemas.stop()
            await registry.close()
        await pressure.stop()
        await client.aclose()

    mesh = create_server(settings, IngestDeps(client, layout, pressure, schemas))
    # Without Redis nothing can be acknowledged; storage (schemas) has its own outage rules.
    mesh.watch_dependencies(redis_check(settings.redis_url))
    await run_until_signalled(mesh, grace=settings.grace_seconds, on_stop=stop)


def main() -> None:
    run_service("ingest", IngestSettings, serve)
