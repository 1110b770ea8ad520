"""Processor wiring: Redis + storage channel -> worker task + status server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.processor.definition_follower import DefinitionFollower, DefinitionStub
from services.processor.delivery.engine_storage import EngineStorage
from services.processor.delivery.storage_client import StorageWriter, storage_client
from services.processor.engine.clock import ClockConfig
from services.processor.processing.committer import EngineConfig
from services.processor.service import ProcessorServicer
from services.processor.settings import ProcessorSettings
from services.processor.worker import EngineSetup, StreamWorker, WorkerConfig
from streammesh.api.processor.v1 import processor_pb2, processor_pb2_grpc
from streammesh.mesh import (
    MeshServer,
    PeerPolicy,
    ServiceBinding,
    create_mesh_server,
    run_until_signalled,
)
from streammesh.mesh.health import redis_check
from streammesh.mesh.metrics import ServiceMetrics
from streammesh.mesh.metrics.processor import PartitionLagSampler, ProcessorCollector
from streammesh.mesh.redis_client import connect_redis
from streammesh.mesh.startup import load_tls, run_service
from streammesh.mesh.tasks import stop_task
from streammesh.streams import StreamLayout

__all__ = ["ProcessorDeps", "build_worker", "create_server", "main", "serve", "stream_layout"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessorDeps:
    worker: StreamWorker
    lag: PartitionLagSampler | None = None
    """Samples the owned partitions' lag for the metrics (none: not reported)."""


def worker_config(settings: ProcessorSettings) -> WorkerConfig:
    """Every WorkerConfig field is a processor setting of the same name (a test keeps it so)."""
    return WorkerConfig(
        **{field.name: getattr(settings, field.name) for field in dataclasses.fields(WorkerConfig)}
    )


def engine_config(settings: ProcessorSettings) -> EngineConfig:
    """The engine's settings (checkpoint cadence, watermark clock)."""
    return EngineConfig(
        clock=ClockConfig(
            out_of_orderness_nanos=settings.engine_out_of_orderness_ms * 1_000_000,
            idle_timeout_nanos=settings.engine_idle_timeout_ms * 1_000_000,
        ),
        checkpoint_batches=settings.engine_checkpoint_batches,
        checkpoint_seconds=settings.engine_checkpoint_seconds,
    )


def stream_layout(settings: ProcessorSettings) -> StreamLayout:
    """The queue's partitions and consumer group, as the settings name them."""
    return StreamLayout(
        prefix=settings.stream_prefix, partitions=settings.partitions, group=settings.group
    )


def build_worker(
    settings: ProcessorSettings,
    client: aioredis.Redis,
    writer: StorageWriter,
    engine: EngineSetup | None = None,
) -> StreamWorker:
    return StreamWorker(
        client,
        stream_layout(settings),
        consumer=settings.consumer,
        store=writer.store,
        dead_letters=writer.record_dead_letter,
        config=worker_config(settings),
        engine=engine,
    )


def create_server(settings: ProcessorSettings, deps: ProcessorDeps) -> MeshServer:
    metrics = ServiceMetrics("processor")
    metrics.registry.register(ProcessorCollector(deps.worker, deps.lag))
    return create_mesh_server(
        settings,
        identity="processor",
        bindings=[
            ServiceBinding(
                processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"],
                processor_pb2_grpc.add_ProcessorServiceServicer_to_server,
                ProcessorServicer(deps.worker, settings.group),
            )
        ],
        # Who may call what: the `processor` table of the policy file (streammesh/mesh/policy.toml).
        guard=PeerPolicy.load(settings, "processor"),
        metrics=metrics,
    )


def _exit_if_worker_died(task: asyncio.Task[None]) -> None:
    """A processor whose worker (or definition follower, which would leave its engines on
    stale definitions) died must not keep reporting SERVING: drain and exit so the supervisor
    restarts it (its pending entries are re-read by the next life or reclaimed)."""
    if task.cancelled() or task.exception() is None:
        return
    log.critical("%s died", task.get_name(), exc_info=task.exception())
    os.kill(os.getpid(), signal.SIGTERM)


async def serve(settings: ProcessorSettings) -> None:
    load_tls(settings.tls_dir, "processor")  # a missing file is a StartupError, named
    client = connect_redis(settings.redis_url, longest_block_ms=settings.block_ms)
    # One mesh client for every call to storage (events, dead letters, engine, definitions).
    storage = storage_client(
        settings.storage_target,
        settings.tls_dir,
        timeout_seconds=settings.store_timeout_seconds,
        tls_reload_seconds=settings.tls_reload_seconds,
    )
    writer = StorageWriter(storage)
    follower = DefinitionFollower(
        storage.stub(DefinitionStub), poll_interval=settings.definitions_poll_seconds
    )
    following = asyncio.create_task(follower.run(), name="definition-follower")
    following.add_done_callback(_exit_if_worker_died)
    engine = EngineSetup(EngineStorage(storage.channel), follower, engine_config(settings))
    worker = build_worker(settings, client, writer, engine)
    try:
        # A conflict (LegacyKeysConflict, a StartupError) stops the start with its message.
        await worker.move_legacy_keys()
    except (RedisError, OSError) as error:
        log.warning(
            "Redis unreachable at start (%s): the worker checks the key layout later", error
        )
    task = asyncio.create_task(worker.run(), name="stream-worker")
    task.add_done_callback(_exit_if_worker_died)
    lag = PartitionLagSampler(client, stream_layout(settings), worker.ownership)
    sampling = asyncio.create_task(lag.run(), name="partition-lag")

    async def stop_worker() -> None:
        # Finish the batch in hand (it is acknowledged only if stored), release the leases so
        # the other processors take over at once, then close connections.
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=settings.store_timeout_seconds + 2)
        await stop_task(following)
        await stop_task(sampling)
        await storage.close()
        await client.aclose()

    mesh = create_server(settings, ProcessorDeps(worker, lag))
    # Reports only: the worker rides out a Redis outage on its own (README, "Replicas and
    # health").
    mesh.watch_dependencies(redis_check(settings.redis_url))
    await run_until_signalled(mesh, grace=settings.grace_seconds, on_stop=stop_worker)


def main() -> None:
    run_service("processor", ProcessorSettings, serve)
