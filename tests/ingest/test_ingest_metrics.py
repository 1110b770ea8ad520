"""Ingest's pipeline metrics on a real server over real Redis, read from its own registry:
accepted events and back-pressure refusals counted per batch, and the queue's backlog per
partition as back-pressure sampled it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from streammesh.mesh import MeshServer
from streammesh.streams import StreamLayout
from tests.ingest.test_backpressure import Ingest, _batch, _ingest, _key_in, _settings, _stub


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def layout(redis_client: aioredis.Redis, redis_prefix: str) -> StreamLayout:
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=4)
    await layout.ensure_group(redis_client)
    return layout


@pytest.fixture
async def ingest(
    pki_dir: Path, redis_client: aioredis.Redis, layout: StreamLayout
) -> AsyncIterator[Ingest]:
    """Ingest refusing a partition's fourth unacknowledged event."""
    async with _ingest(_settings(pki_dir), redis_client, layout) as running:
        yield running


def counter(mesh: MeshServer, name: str, **labels: str) -> float:
    return mesh.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_accepted_events_and_refusals_are_counted_per_batch(
    ingest: Ingest, pki_dir: Path, layout: StreamLayout
) -> None:
    key = _key_in(layout, 1)
    channel, stub = _stub(ingest.mesh.port, pki_dir)
    async with channel:
        await stub.PublishBatch(_batch(key, 0, events=2), timeout=5)
        await stub.PublishBatch(_batch(key, 1, events=1), timeout=5)
        # The partition holds 3 unacknowledged events: its limit. The next batch waits.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PublishBatch(_batch(key, 2, events=1), timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    mesh = ingest.mesh
    assert counter(mesh, "streammesh_ingest_events_accepted_total") == 3
    assert counter(mesh, "streammesh_ingest_backpressure_refusals_total") == 1
    handled = {
        "grpc_type": "unary",
        "grpc_service": "streammesh.ingest.v1.IngestService",
        "grpc_method": "PublishBatch",
    }
    assert counter(mesh, "grpc_server_handled_total", **handled, grpc_code="OK") == 2
    assert counter(mesh, "grpc_server_handled_total", **handled, grpc_code="ResourceExhausted") == 1
    await ingest.pressure.sample()
    assert counter(mesh, "streammesh_queue_unacked_events", partition="1") == 3
    assert counter(mesh, "streammesh_queue_unacked_events", partition="0") == 0
    assert counter(mesh, "streammesh_queue_unacked_bytes", partition="1") > 0


async def test_two_servers_in_one_process_count_apart(
    pki_dir: Path, redis_client: aioredis.Redis, layout: StreamLayout
) -> None:
    settings = _settings(pki_dir, max_partition_unacked_events=0)
    async with (
        _ingest(settings, redis_client, layout) as first,
        _ingest(settings, redis_client, layout) as second,
    ):
        channel, stub = _stub(first.mesh.port, pki_dir)
        async with channel:
            await stub.PublishBatch(_batch("k", 0, events=4), timeout=5)
        assert counter(first.mesh, "streammesh_ingest_events_accepted_total") == 4
        assert counter(second.mesh, "streammesh_ingest_events_accepted_total") == 0
