"""Back-pressure and durability at ingest: a batch that would take the unacknowledged events or
bytes of a partition, or of the whole queue, past its limit (or arrives while Redis is too full)
gets RESOURCE_EXHAUSTED with a retry delay until the consumer catches up; require_aof refuses to
start on a Redis without AOF."""

from __future__ import annotations

import asyncio
import contextlib
import re
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
from services.ingest.queue import DurabilityError, StreamAppender, check_durability
from services.ingest.server import IngestDeps, create_server, pressure_limits, serve
from services.ingest.settings import IngestSettings
from services.processor.source.ownership import PartitionOwnership
from streammesh.api.common.v1 import event_pb2
from streammesh.api.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from streammesh.backlog import Backlog, read_backlog
from streammesh.entries import Entry
from streammesh.mesh import MeshServer, TlsMaterial, create_channel, service_config
from streammesh.mesh.errors import ResourceExhausted
from streammesh.streams import COUNT_FIELD, StreamLayout, body_bytes
from tests.conftest import TRUST_DOMAIN, StreamEntries, xrange_entries


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


def _settings(pki_dir: Path, **limits: int) -> IngestSettings:
    defaults = {
        "max_unacked_events": 0,
        "max_unacked_bytes": 0,
        "max_partition_unacked_events": 3,
        "max_partition_unacked_bytes": 0,
    }
    return IngestSettings(
        port=0,
        tls_dir=pki_dir,
        trust_domain=TRUST_DOMAIN,
        partitions=4,
        # No sample during a test unless it takes one: a sample taken while an append is in
        # flight may count it twice until the next (pressure.py), which would make the exact
        # counts below flaky.
        pressure_sample_ms=10_000,
        retry_after_seconds=0.5,
    ).model_copy(update=defaults | limits)


@contextlib.asynccontextmanager
async def _ingest(
    settings: IngestSettings, redis_client: aioredis.Redis, layout: StreamLayout
) -> AsyncIterator[Ingest]:
    pressure = BackPressure(redis_client, layout, pressure_limits(settings))
    await pressure.sample()
    pressure.start()
    mesh = create_server(settings, IngestDeps(redis_client, layout, pressure))
    await mesh.start()
    try:
        yield Ingest(mesh, pressure)
    finally:
        await mesh.stop(0)
        await pressure.stop()


@pytest.fixture
async def ingest(
    pki_dir: Path, redis_client: aioredis.Redis, layout: StreamLayout
) -> AsyncIterator[Ingest]:
    """Ingest refusing a partition's fourth unacknowledged event."""
    async with _ingest(_settings(pki_dir), redis_client, layout) as running:
        yield running


def _stub(port: int, pki_dir: Path) -> tuple[grpc.aio.Channel, ingest_pb2_grpc.IngestServiceStub]:
    channel = create_channel(
        f"127.0.0.1:{port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="ingest",
        config=service_config("streammesh.ingest.v1.IngestService", health_checked=False),
    )
    return channel, ingest_pb2_grpc.IngestServiceStub(channel)


def _batch(
    key: str, n: int, events: int = 1, payload: bytes = b""
) -> ingest_pb2.PublishBatchRequest:
    return ingest_pb2.PublishBatchRequest(
        events=[
            event_pb2.Event(id=f"{key}-{n}-{i}", key=key, type="t", payload=payload)
            for i in range(events)
        ]
    )


def _key_in(layout: StreamLayout, partition: int, avoid: str = "") -> str:
    return next(
        f"key-{i}"
        for i in range(1000)
        if layout.partition_for(f"key-{i}") == partition and f"key-{i}" != avoid
    )


async def _drain(client: aioredis.Redis, layout: StreamLayout) -> None:
    """What a processor does, minus the store: read every entry and acknowledge it with the
    processor's fenced ack, which subtracts it from the backlog counters."""
    owner = PartitionOwnership(client, layout, "drainer", lease_ttl_ms=10_000, heartbeat_ms=100)
    await owner.acquire(range(layout.partitions))
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
            entries: list[Entry] = list(reply[0][1])
            assert await owner.ack(layout.partition_of_stream(stream), *entries)
    await owner.release(range(layout.partitions))


def _retry_ms(error: grpc.aio.AioRpcError) -> int:
    status = rpc_status.from_call(error)
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    return int(retry.retry_delay.ToMilliseconds())


async def test_a_partition_over_its_event_limit_is_refused_until_drained(
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
        assert refused is not None, "50 events were accepted into a partition limited to 3"
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Counted at admission: no sample had to come first.
        assert accepted == 3
        assert refused.details() == (
            "partition 1 holds 3 unacknowledged events and this batch adds 1 events, over the "
            "limit of 3 events per partition; retry later"
        )
        assert _retry_ms(refused) == 500

        # Other partitions are not held back.
        await stub.PublishBatch(_batch(cold, 0), timeout=5)

        await _drain(redis_client, layout)
        assert (await read_backlog(redis_client, layout))[1] == Backlog()
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.PublishBatch(_batch(hot, 99), timeout=5)  # the sample is still the old one
        await ingest.pressure.sample()
        await stub.PublishBatch(_batch(hot, 100), timeout=5)
    assert await redis_client.xlen(layout.stream(1)) == 4


async def test_byte_and_total_limits_name_the_limit_and_the_figure(
    pki_dir: Path, redis_client: aioredis.Redis, layout: StreamLayout
) -> None:
    """Batches of 4 events of 1000 payload bytes into two partitions: the per-partition bytes
    limit, then the totals of events and of bytes over all partitions."""
    keys = [_key_in(layout, 0), _key_in(layout, 3)]
    cases = [
        ({"max_partition_unacked_events": 0, "max_partition_unacked_bytes": 6000}, 2,
         r"partition 0 holds 4,\d{3} bytes of unacknowledged events and this batch adds 4,\d{3} "
         r"bytes, over the limit of 6,000 bytes per partition; retry later"),
        ({"max_partition_unacked_events": 0, "max_unacked_events": 10}, 2,
         "the event queue holds 8 unacknowledged events and this batch adds 4 events, over the "
         "limit of 10 events in all; retry later"),
        ({"max_partition_unacked_events": 0, "max_unacked_bytes": 10_000}, 2,
         r"the event queue holds 8,\d{3} bytes of unacknowledged events and this batch adds "
         r"4,\d{3} bytes, over the limit of 10,000 bytes in all; retry later"),
    ]  # fmt: skip
    for limits, accepted_batches, refusal in cases:
        # Each case publishes the same ids: forget them (the idempotency window) as well.
        remembered = [key async for key in redis_client.scan_iter(f"{layout.prefix}:idem:*")]
        await redis_client.delete(*layout.streams(), *map(layout.unacked_key, range(4)))
        if remembered:
            await redis_client.delete(*remembered)
        await layout.ensure_group(redis_client)
        async with _ingest(_settings(pki_dir, **limits), redis_client, layout) as ingest:
            channel, stub = _stub(ingest.mesh.port, pki_dir)
            async with channel:
                accepted = 0
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    for n in range(10):
                        await stub.PublishBatch(
                            _batch(keys[n % 2], n, events=4, payload=b"x" * 1000), timeout=5
                        )
                        accepted += 1
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert accepted == accepted_batches, limits
            assert re.fullmatch(refusal, caught.value.details() or ""), caught.value.details()
            assert _retry_ms(caught.value) == 500
            backlog = await read_backlog(redis_client, layout)
            assert sum(b.events for b in backlog) == 4 * accepted_batches


async def test_a_publish_stream_ends_at_the_first_refused_batch(
    ingest: Ingest, layout: StreamLayout, pki_dir: Path, redis_client: aioredis.Redis
) -> None:
    hot = _key_in(layout, 3)
    appender = StreamAppender(redis_client, layout)
    await appender.append(_batch(hot, 0, events=3).events, producer="elsewhere")
    await ingest.pressure.sample()
    requests = [
        ingest_pb2.PublishRequest(sequence=1, events=_batch(_key_in(layout, 0), 0).events),
        ingest_pb2.PublishRequest(sequence=2, events=_batch(hot, 1).events),
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
    assert "partition 3 holds 3 unacknowledged events" in refusal.message
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == refusal.message
    final = rpc_status.from_call(caught.value)
    assert final is not None and final.SerializeToString() == refusal.status_details
    retry = error_details_pb2.RetryInfo()
    assert final.details[0].Unpack(retry) and retry.retry_delay.ToNanoseconds() == 500_000_000
    assert await redis_client.xlen(layout.stream(3)) == 1


async def test_the_counters_follow_the_appends_and_bound_the_stream_memory(
    redis_client: aioredis.Redis, layout: StreamLayout
) -> None:
    """Every append adds the entries' events and batch bytes; MEMORY USAGE of the stream per
    counted byte is the overhead factor the docs state (printed, and checked loosely)."""
    appender = StreamAppender(redis_client, layout, max_entry_bytes=64 * 1024)
    key = _key_in(layout, 2)
    for n in range(40):
        await appender.append(_batch(key, n, events=25, payload=b"p" * 200).events, producer="x")
    entries = await xrange_entries(redis_client, layout.stream(2))
    counted = (await read_backlog(redis_client, layout))[2]
    assert counted == Backlog(
        events=sum(int(fields[COUNT_FIELD]) for _, fields in entries),
        bytes=sum(body_bytes(fields) for _, fields in entries),
    )
    assert counted.events == 1000
    usage = int(await redis_client.memory_usage(layout.stream(2), samples=0) or 0)
    print(
        f"\n[stream memory] {len(entries)} entries, {counted.bytes:,} counted bytes, "
        f"MEMORY USAGE {usage:,} bytes: {usage / counted.bytes:.3f} per counted byte"
    )
    assert counted.bytes <= usage < 1.25 * counted.bytes


async def test_redis_memory_limit_refuses_every_batch(
    redis_client: aioredis.Redis, layout: StreamLayout
) -> None:
    full = BackPressure(redis_client, layout, PressureLimits(max_memory_bytes=1))
    await full.sample()
    with pytest.raises(ResourceExhausted, match="queue is full") as caught:
        full.admit({0: (1, 10)})
    assert caught.value.retry_after_seconds == 1.0
    # No explicit limit and no maxmemory on the test Redis (or far from it): accepted.
    derived = BackPressure(redis_client, layout, PressureLimits())
    await derived.sample()
    derived.admit({p: (1, 10) for p in range(4)})


async def test_admission_counts_until_the_next_sample_replaces_it(
    redis_client: aioredis.Redis, layout: StreamLayout
) -> None:
    pressure = BackPressure(redis_client, layout, PressureLimits(max_partition_events=10))
    await pressure.sample()
    pressure.admit({0: (6, 600)})
    assert pressure.backlog(0) == Backlog(events=6, bytes=600)
    with pytest.raises(ResourceExhausted, match="partition 0 holds 6 unacknowledged events"):
        pressure.admit({0: (5, 500), 1: (1, 1)})
    assert pressure.backlog(1) == Backlog(), "a refused batch is not counted anywhere"
    pressure.admit({0: (4, 400)})  # exactly at the limit
    await pressure.sample()
    assert pressure.backlog(0) == Backlog(events=10, bytes=1000), "not settled: still counted"
    pressure.settled({0: (6, 600)})
    pressure.settled({0: (4, 400)})
    await pressure.sample()  # settled, and nothing was appended: Redis says empty
    assert pressure.backlog(0) == Backlog()
    pressure.admit({0: (50, 5000)})  # an empty partition takes a batch over the limit


async def test_a_stale_sample_lets_batches_through(
    redis_client: aioredis.Redis, layout: StreamLayout
) -> None:
    await StreamAppender(redis_client, layout).append(
        _batch(_key_in(layout, 0), 0, events=3).events, producer="x"
    )
    pressure = BackPressure(
        redis_client,
        layout,
        PressureLimits(max_partition_events=1, stale_after_seconds=0.05),
    )
    await pressure.sample()
    with pytest.raises(ResourceExhausted):
        pressure.admit({0: (1, 1)})
    await asyncio.sleep(0.06)
    pressure.admit({0: (1, 1)})


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
