"""The processor's metrics on its real server's /metrics, after driving a real worker over real
Redis (and, with the engine on, a real storage over mTLS): partitions owned and takeovers,
events stored, store failures, dead letters, the engine's outputs and checkpoints as storage
holds them, repeated events the engine dropped per partition, and the lag and pending count per
owned partition as the sampler read them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from services.processor.delivery.store import PermanentStoreError, StoreResult
from services.processor.server import ProcessorDeps, create_server
from services.processor.settings import ProcessorSettings
from services.processor.worker import StreamWorker
from streammesh.entries import QueuedBody
from streammesh.mesh.metrics.processor import PartitionLagSampler
from streammesh.streams import StreamLayout
from tests.conftest import TRUST_DOMAIN
from tests.mesh.test_metrics_endpoint import free_port, scrape
from tests.processor.conftest import (
    ONE_OWNER,
    RecordingStore,
    Running,
    append,
    make_layout,
    pending,
    wait_for,
)
from tests.processor.test_engine_wiring import (
    RULES,
    WINDOWS,
    Events,
    Storage,
    define,
    make_worker,
    readings,
    storage,
)
from tests.storage.conftest import engine, server, start_server
from tests.storage.test_engine_checkpoints import stored

# Fixtures of storage and of the engine wiring tests, used here.
__all__ = ["engine", "make_worker", "server", "start_server", "storage"]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextlib.asynccontextmanager
async def processor_server(
    pki_dir: Path, worker: StreamWorker, lag: PartitionLagSampler | None = None
) -> AsyncIterator[int]:
    """The processor's own server (create_server) around `worker`; yields its /metrics port."""
    port = free_port()
    settings = ProcessorSettings(
        tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, port=0, metrics_port=port
    )
    mesh = create_server(settings, ProcessorDeps(worker, lag))
    await mesh.start()
    try:
        yield port
    finally:
        await mesh.stop(0)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


class FlakyStore(RecordingStore):
    """Refuses the entry of event "poison" for good; fails the first two calls (an outage)."""

    async def __call__(self, raw: QueuedBody) -> StoreResult:
        if raw.batch().events[0].event.id == "poison":
            raise PermanentStoreError("INVALID_ARGUMENT: bad")
        return await super().__call__(raw)


async def test_ownership_stores_failures_dead_letters_and_lag_on_metrics(
    pki_dir: Path, redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 2)
    await append(redis_client, layout, 1, ["poison"])
    await append(redis_client, layout, 1, ["b1", "b2"])
    gate = asyncio.Event()
    store = FlakyStore(failures_left=2, gates={"held": gate})
    worker = StreamWorker(
        redis_client,
        layout,
        consumer="c1",
        store=store,
        config=dataclasses.replace(ONE_OWNER, max_deliveries=1),
    )
    lag = PartitionLagSampler(redis_client, layout, worker.ownership, interval=3600)
    async with processor_server(pki_dir, worker, lag) as port:
        running.start(worker)
        await wait_for(lambda: store.stored == ["b1", "b2"], what="partition 1 stored")
        # Partition 0: one entry held in its store call, three more behind it not yet read.
        await append(redis_client, layout, 0, ["held"])
        await wait_for(lambda: "held" in store.entered, what="the held store call")
        for n in range(3):
            await append(redis_client, layout, 0, [f"a{n}"])
        await lag.sample()
        during = await scrape(port)
        gate.set()

        async def drained() -> bool:
            return len(store.stored) == 6 and await pending(redis_client, layout) == 0

        await wait_for(drained, what="everything stored")
        await lag.sample()
        after = await scrape(port)
    await running.stop("c1")
    assert value(during, "streammesh_processor_partitions_owned") == 2
    assert value(during, "streammesh_processor_takeovers_total") == 2
    assert value(during, "streammesh_processor_partition_pending", partition="0") == 1
    assert value(during, "streammesh_processor_partition_lag", partition="0") == 3
    assert value(during, "streammesh_processor_partition_lag", partition="1") == 0
    assert value(after, "streammesh_processor_partition_lag", partition="0") == 0
    assert value(after, "streammesh_processor_partition_pending", partition="0") == 0
    assert value(after, "streammesh_processor_events_stored_total") == 6
    assert value(after, "streammesh_processor_store_failures_total") == 3  # 2 outages, 1 refusal
    assert value(after, "streammesh_processor_dead_letters_total") == 1
    assert value(after, "streammesh_processor_alerts_total") == 0  # the engine is off


async def test_engine_outputs_and_checkpoints_on_metrics_match_what_storage_holds(
    pki_dir: Path,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    storage: Storage,
    engine: AsyncEngine,
    make_worker: Callable[..., StreamWorker],
    running: Running,
) -> None:
    await define(storage, WINDOWS, RULES)
    layout: StreamLayout = await make_layout(redis_client, redis_prefix, 2)
    events = Events()
    worker = make_worker(layout, "w1", checkpoint_batches=1)
    committer = worker.committer
    assert committer is not None
    async with processor_server(pki_dir, worker) as port:
        running.start(worker)
        for n in range(3):
            await events.append(redis_client, layout, n % 2, readings("r", n * 10, 10, "k", 10**9))
        await wait_for(lambda: committer.events_processed == 30, what="processed")

        async def acknowledged() -> bool:
            return await pending(redis_client, layout) == 0

        await wait_for(acknowledged, what="acknowledged")
        samples = await scrape(port)
    await running.stop("w1")
    held = stored_counts(await stored(engine))
    assert held["alerts"] > 0 and held["results"] > 0
    assert value(samples, "streammesh_processor_alerts_total") == held["alerts"]
    assert value(samples, "streammesh_processor_window_results_total") == held["results"]
    assert value(samples, "streammesh_processor_late_events_total") == held["late"]
    # Everything was acknowledged, so a checkpoint covers each partition's entries.
    assert value(samples, "streammesh_processor_checkpoints_total") >= 2
    assert value(samples, "streammesh_processor_events_stored_total") == 30


def stored_counts(found: dict[str, set[Any]]) -> dict[str, int]:
    return {kind: len(rows) for kind, rows in found.items()}


async def test_events_the_engine_drops_as_repeats_are_counted_per_partition_on_metrics(
    pki_dir: Path,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    storage: Storage,
    make_worker: Callable[..., StreamWorker],
    running: Running,
) -> None:
    """Four events of partition 0 queued again in a later entry (a publish retried past
    ingest's idempotency window): the engine drops them before its windows, and /metrics
    counts them for partition 0 only."""
    await define(storage, WINDOWS, RULES)
    layout: StreamLayout = await make_layout(redis_client, redis_prefix, 2)
    events = Events()
    worker = make_worker(layout, "w1", checkpoint_batches=1)
    committer = worker.committer
    assert committer is not None
    first = readings("d", 0, 10, "k", 10**9)
    async with processor_server(pki_dir, worker) as port:
        running.start(worker)
        await events.append(redis_client, layout, 0, first)
        await events.append(redis_client, layout, 1, readings("e", 0, 5, "k2", 10**9))
        await events.append(redis_client, layout, 0, first[:4])  # the same ids again
        await wait_for(lambda: committer.events_processed == 19, what="processed")

        async def acknowledged() -> bool:
            return await pending(redis_client, layout) == 0

        await wait_for(acknowledged, what="acknowledged")
        samples = await scrape(port)
    await running.stop("w1")
    assert value(samples, "streammesh_processor_engine_duplicates_total", partition="0") == 4
    assert ("streammesh_processor_engine_duplicates_total", (("partition", "1"),)) not in samples
