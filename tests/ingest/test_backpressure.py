"""Back-pressure and durability at ingest: a partition too far behind (or Redis too full) gets
RESOURCE_EXHAUSTED with a retry delay until the consumer catches up; require_aof refuses to
start on a Redis without AOF."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from services.ingest.pressure import BackPressure, PressureLimits
from services.ingest.queue import DurabilityError, check_durability
from services.ingest.server import IngestDeps, create_server, pressure_limits, serve
from services.ingest.settings import IngestSettings
from streammesh.api.common.v1 import event_pb2
from streammesh.api.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from streammesh.mesh import MeshServer, TlsMaterial, create_channel, service_config
from streammesh.mesh.errors import ResourceExhausted
from streammesh.streams import StreamLayout
from tests.conftest import TRUST_DOMAIN, StreamEntries


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


@dataclass
class Ingest:
    mesh: MeshServer
    pressure: BackPressure

    async def sees(self, partition: int, lag: int) -> None:
        """Wait (at most 5 s) until the sampler saw `lag` entries in `partition`."""
        async with asyncio.timeout(5):
            while (self.pressure.lag(partition) or 0) < lag:
                await asyncio.sleep(0.005)


@pytest.fixture
async def ingest(
    pki_dir: Path, redis_client: aioredis.Redis, layout: StreamLayout
) -> AsyncIterator[Ingest]:
    settings = IngestSettings(
        port=0,
        tls_dir=pki_dir,
        trust_domain=TRUST_DOMAIN,
        partitions=4,
        max_partition_lag=3,
        pressure_sample_ms=20,
        retry_after_seconds=0.5,
    )
    pressure = BackPressure(redis_client, layout, pressure_limits(settings))
    await pressure.sample()
    pressure.start()
    mesh = create_server(settings, IngestDeps(redis_client, layout, pressure))
    await mesh.start()
    yield Ingest(mesh, pressure)
    await mesh.stop(0)
    await pressure.stop()


def _stub(port: int, pki_dir: Path) -> tuple[grpc.aio.Channel, ingest_pb2_grpc.IngestServiceStub]:
    channel = create_channel(
        f"127.0.0.1:{port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="ingest",
        config=service_config("streammesh.ingest.v1.IngestService", health_checked=False),
    )
    return channel, ingest_pb2_grpc.IngestServiceStub(channel)


def _batch(key: str, n: int) -> ingest_pb2.PublishBatchRequest:
    return ingest_pb2.PublishBatchRequest(
        events=[event_pb2.Event(id=f"{key}-{n}", key=key, type="t")]
    )


def _key_in(layout: StreamLayout, partition: int, avoid: str = "") -> str:
    return next(
        f"key-{i}"
        for i in range(1000)
        if layout.partition_for(f"key-{i}") == partition and f"key-{i}" != avoid
    )


async def _drain(client: aioredis.Redis, layout: StreamLayout) -> None:
    """What a processor does, minus the store: read every entry and acknowledge it."""
    for stream in layout.streams():
        for _ in range(100):
            # RESP2 reply of a client that does not decode: [(stream, [(id, fields), ...])],
            # or nothing at all.
            reply = cast(
                list[tuple[bytes, StreamEntries]] | None,
                await client.xreadgroup(layout.group, "drainer", {stream: ">"}, count=100),
            )
            if not reply or not reply[0][1]:
                break
            await client.xack(stream, layout.group, *(entry_id for entry_id, _ in reply[0][1]))


async def test_a_lagging_partition_is_refused_until_drained(
    ingest: Ingest, layout: StreamLayout, pki_dir: Path, redis_client: aioredis.Redis
) -> None:
    hot = _key_in(layout, 1)
    cold = _key_in(layout, 2)
    channel, stub = _stub(ingest.mesh.port, pki_dir)
    async with channel:
        accepted, refused = 0, None
        for n in range(50):
            try:
                await stub.PublishBatch(_batch(hot, n), timeout=5)
            except grpc.aio.AioRpcError as error:
                refused = error
                break
            accepted += 1
            await ingest.sees(1, accepted)
        assert refused is not None, "50 batches were accepted into a partition limited to 3"
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "partition 1" in (refused.details() or "")
        assert accepted == 3
        status = rpc_status.from_call(refused)
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry)
        assert retry.retry_delay.ToMilliseconds() == 500

        # Other partitions are not held back.
        await stub.PublishBatch(_batch(cold, 0), timeout=5)

        await _drain(redis_client, layout)
        for n in range(100):
            try:
                await stub.PublishBatch(_batch(hot, 100 + n), timeout=5)
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                await asyncio.sleep(0.02)
        else:
            pytest.fail("still refused after the partition was drained")
    assert await redis_client.xlen(layout.stream(1)) == 4


async def test_a_publish_stream_ends_at_the_first_refused_batch(
    ingest: Ingest, layout: StreamLayout, pki_dir: Path, redis_client: aioredis.Redis
) -> None:
    hot = _key_in(layout, 3)
    for n in range(3):
        await redis_client.xadd(layout.stream(3), {"events": 1, "n": n})
    await ingest.sees(3, 3)
    requests = [
        ingest_pb2.PublishRequest(sequence=1, events=_batch(_key_in(layout, 0), 0).events),
        ingest_pb2.PublishRequest(sequence=2, events=_batch(hot, 0).events),
    ]
    channel, stub = _stub(ingest.mesh.port, pki_dir)
    replies = []
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for reply in stub.Publish(iter(requests), timeout=5):
                replies.append(reply)
    # Batch 1 acknowledged; batch 2 refused in a message first (its status, RetryInfo
    # included), then the stream ends with the same status once the client half-closed.
    assert [(r.sequence, r.accepted, r.HasField("refusal")) for r in replies] == [
        (1, 1, False),
        (0, 0, True),
    ]
    refusal = replies[1].refusal
    assert (refusal.sequence, refusal.code) == (2, code_pb2.RESOURCE_EXHAUSTED)
    assert "partition 3" in refusal.message
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == refusal.message
    final = rpc_status.from_call(caught.value)
    assert final is not None and final.SerializeToString() == refusal.status_details
    retry = error_details_pb2.RetryInfo()
    assert final.details[0].Unpack(retry) and retry.retry_delay.ToNanoseconds() == 500_000_000
    assert await redis_client.xlen(layout.stream(3)) == 3


async def test_redis_memory_limit_refuses_every_batch(
    redis_client: aioredis.Redis, layout: StreamLayout
) -> None:
    full = BackPressure(redis_client, layout, PressureLimits(max_memory_bytes=1))
    await full.sample()
    with pytest.raises(ResourceExhausted, match="queue is full") as caught:
        full.check([0])
    assert caught.value.retry_after_seconds == 1.0
    # No explicit limit and no maxmemory on the test Redis (or far from it): accepted.
    derived = BackPressure(redis_client, layout, PressureLimits())
    await derived.sample()
    derived.check([0, 1, 2, 3])


async def test_lag_counts_pending_and_undelivered_entries(
    redis_client: aioredis.Redis, layout: StreamLayout
) -> None:
    stream = layout.stream(0)
    ids = [await redis_client.xadd(stream, {"events": 1}) for _ in range(5)]
    await redis_client.xreadgroup(layout.group, "c", {stream: ">"}, count=3)
    await redis_client.xack(stream, layout.group, ids[0])
    pressure = BackPressure(redis_client, layout, PressureLimits())
    await pressure.sample()
    assert pressure.lag(0) == 4  # 2 pending + 2 undelivered
    # After XDEL in the undelivered range Redis cannot compute lag: XLEN bounds it.
    await redis_client.xdel(stream, ids[4])
    await pressure.sample()
    assert pressure.lag(0) == 4


async def test_a_stale_sample_lets_batches_through(
    redis_client: aioredis.Redis, layout: StreamLayout
) -> None:
    for _ in range(3):
        await redis_client.xadd(layout.stream(0), {"events": 1})
    pressure = BackPressure(
        redis_client, layout, PressureLimits(max_partition_lag=1, stale_after_seconds=0.05)
    )
    await pressure.sample()
    with pytest.raises(ResourceExhausted):
        pressure.check([0])
    await asyncio.sleep(0.06)
    pressure.check([0])


async def test_require_aof_refuses_to_start_without_aof(
    redis_client: aioredis.Redis, redis_url: str, redis_prefix: str, pki_dir: Path
) -> None:
    info = await redis_client.info("persistence")
    if int(info["aof_enabled"]):
        pytest.skip("this Redis has AOF on")
    assert await check_durability(redis_client, require_aof=False) == "AOF off"
    settings = IngestSettings(
        port=0,
        tls_dir=pki_dir,
        trust_domain=TRUST_DOMAIN,
        redis_url=redis_url,
        stream_prefix=f"{redis_prefix}events",
        require_aof=True,
    )
    with pytest.raises(DurabilityError, match="AOF off"):
        await serve(settings)
    assert [k async for k in redis_client.scan_iter(match=f"{redis_prefix}*")] == []
