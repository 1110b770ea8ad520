"""Ingest over real mTLS with real Redis: validation, partitioning, acknowledgement order, policy."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.ingest.server import IngestDeps, create_server
from services.ingest.settings import IngestSettings
from streammesh.api.common.v1 import event_pb2
from streammesh.api.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from streammesh.entries import entry_body
from streammesh.mesh import MeshServer, TlsMaterial, create_channel, service_config
from streammesh.streams import COLUMNS_FIELD, StreamLayout
from tests.conftest import TRUST_DOMAIN, xrange_entries


def _stub(
    port: int, pki_dir: Path, who: str = "gateway"
) -> tuple[grpc.aio.Channel, ingest_pb2_grpc.IngestServiceStub]:
    channel = create_channel(
        f"127.0.0.1:{port}",
        TlsMaterial.load(pki_dir, who),
        server_name="ingest",
        config=service_config("streammesh.ingest.v1.IngestService", health_checked=False),
    )
    return channel, ingest_pb2_grpc.IngestServiceStub(channel)


def _events(n: int, keys: int = 3, *, batch: int = 0) -> list[event_pb2.Event]:
    """n events; ids "e<i>", or "b<batch>-e<i>" for the batch-th of several (an id published
    again within the idempotency window would be a duplicate)."""
    prefix = f"b{batch}-" if batch else ""
    return [
        event_pb2.Event(id=f"{prefix}e{i}", key=f"k{i % keys}", type="t.test", payload=b"{}")
        for i in range(n)
    ]


async def _queued(
    client: aioredis.Redis, layout: StreamLayout
) -> dict[int, list[event_pb2.QueuedEvent]]:
    found: dict[int, list[event_pb2.QueuedEvent]] = {}
    for partition in range(layout.partitions):
        for _, fields in await xrange_entries(client, layout.stream(partition)):
            assert entry_body(fields).columnar
            batch = entry_body(fields).batch()
            assert batch.partition == partition
            found.setdefault(partition, []).extend(batch.events)
    return found


async def test_batch_is_partitioned_by_key_in_order(
    ingest: tuple[MeshServer, StreamLayout], pki_dir: Path, redis_client: aioredis.Redis
) -> None:
    mesh, layout = ingest
    channel, stub = _stub(mesh.port, pki_dir)
    async with channel:
        reply = await stub.PublishBatch(
            ingest_pb2.PublishBatchRequest(events=_events(30), producer="user-1"), timeout=5
        )
    assert reply.accepted == 30
    assert list(reply.event_ids) == [f"e{i}" for i in range(30)]
    queued = await _queued(redis_client, layout)
    assert sum(len(v) for v in queued.values()) == 30
    for partition, events in queued.items():
        assert all(layout.partition_for(q.event.key) == partition for q in events)
        assert all(q.producer == "user-1" and q.HasField("ingest_time") for q in events)
        for key in {q.event.key for q in events}:
            numbers = [int(q.event.id[1:]) for q in events if q.event.key == key]
            assert numbers == sorted(numbers)


async def test_missing_ids_are_assigned(
    ingest: tuple[MeshServer, StreamLayout], pki_dir: Path
) -> None:
    mesh, _ = ingest
    channel, stub = _stub(mesh.port, pki_dir)
    async with channel:
        reply = await stub.PublishBatch(
            ingest_pb2.PublishBatchRequest(events=[event_pb2.Event(key="k", type="t")]), timeout=5
        )
    assert len(reply.event_ids[0]) == 36


async def test_invalid_events_name_every_field(
    ingest: tuple[MeshServer, StreamLayout], pki_dir: Path, redis_client: aioredis.Redis
) -> None:
    mesh, layout = ingest
    bad = [event_pb2.Event(id="ok", key="k", type="t"), event_pb2.Event(id="x" * 200, type="")]
    channel, stub = _stub(mesh.port, pki_dir)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PublishBatch(ingest_pb2.PublishBatchRequest(events=bad), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    assert status is not None
    details = error_details_pb2.BadRequest()
    status.details[0].Unpack(details)
    fields = {v.field for v in details.field_violations}
    assert fields == {"events[1].id", "events[1].key", "events[1].type"}
    assert await _queued(redis_client, layout) == {}, "a refused batch must queue nothing"


async def test_oversized_and_empty_batches_are_refused(
    ingest: tuple[MeshServer, StreamLayout], pki_dir: Path
) -> None:
    mesh, _ = ingest
    channel, stub = _stub(mesh.port, pki_dir)
    async with channel:
        for events in ([], _events(101)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.PublishBatch(ingest_pb2.PublishBatchRequest(events=events), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_stream_acknowledges_each_batch_in_order(
    ingest: tuple[MeshServer, StreamLayout], pki_dir: Path, redis_client: aioredis.Redis
) -> None:
    mesh, layout = ingest
    requests = [
        ingest_pb2.PublishRequest(sequence=n, events=_events(10, batch=n), producer="p")
        for n in range(1, 6)
    ]
    channel, stub = _stub(mesh.port, pki_dir)
    async with channel:
        acks = [ack async for ack in stub.Publish(iter(requests), timeout=5)]
    assert [a.sequence for a in acks] == [1, 2, 3, 4, 5]
    assert all(a.accepted == 10 for a in acks)
    assert sum(len(v) for v in (await _queued(redis_client, layout)).values()) == 50


async def test_only_the_gateway_may_publish(
    ingest: tuple[MeshServer, StreamLayout], pki_dir: Path
) -> None:
    mesh, _ = ingest
    channel, stub = _stub(mesh.port, pki_dir, who="processor")
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PublishBatch(ingest_pb2.PublishBatchRequest(events=_events(1)), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_redis_down_is_unavailable_not_internal(pki_dir: Path, redis_prefix: str) -> None:
    dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    settings = IngestSettings(port=0, tls_dir=pki_dir, trust_domain=TRUST_DOMAIN)
    mesh = create_server(settings, IngestDeps(dead, StreamLayout(prefix=f"{redis_prefix}x")))
    await mesh.start()
    try:
        channel, stub = _stub(mesh.port, pki_dir)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.PublishBatch(
                    ingest_pb2.PublishBatchRequest(events=_events(1)), timeout=5
                )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await mesh.stop(0)
        await dead.aclose()


async def test_nul_characters_are_refused_at_the_edge(
    ingest: tuple[MeshServer, StreamLayout], pki_dir: Path
) -> None:
    mesh, _ = ingest
    channel, stub = _stub(mesh.port, pki_dir)
    bad = event_pb2.Event(id="n1", key="k\x00", type="t")
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PublishBatch(ingest_pb2.PublishBatchRequest(events=[bad]), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[0].key" in (caught.value.details() or "")


async def test_a_producer_the_store_cannot_hold_is_refused_before_the_ack(
    ingest: tuple[MeshServer, StreamLayout], pki_dir: Path, redis_client: aioredis.Redis
) -> None:
    """The gateway names the producer; one longer than the store's limit (or with a NUL) would be
    acknowledged and then dead-lettered by storage, so ingest refuses it."""
    mesh, layout = ingest
    channel, stub = _stub(mesh.port, pki_dir)
    async with channel:
        for producer in ("p" * 257, "p\x00"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.PublishBatch(
                    ingest_pb2.PublishBatchRequest(events=_events(1), producer=producer), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (caught.value.details() or "").startswith("producer: ")
    assert await _queued(redis_client, layout) == {}


async def test_large_slices_are_cut_into_entries_in_order(
    pki_dir: Path, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    settings = IngestSettings(
        port=0, tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, partitions=1, max_entry_bytes=64 * 1024
    )
    layout = StreamLayout(prefix=f"{redis_prefix}big", partitions=1)
    await layout.ensure_group(redis_client)
    mesh = create_server(settings, IngestDeps(redis_client, layout))
    await mesh.start()
    try:
        events = [
            event_pb2.Event(id=f"e{i}", key="one-key", type="t", payload=b"x" * 10_000)
            for i in range(30)
        ]
        channel, stub = _stub(mesh.port, pki_dir)
        async with channel:
            await stub.PublishBatch(ingest_pb2.PublishBatchRequest(events=events), timeout=5)
        entries = await xrange_entries(redis_client, layout.stream(0))
        batches = [entry_body(f).batch() for _, f in entries]
        assert len(batches) >= 5
        assert all(len(f[COLUMNS_FIELD]) <= 64 * 1024 + 11_000 for _, f in entries)
        ids = [q.event.id for b in batches for q in b.events]
        assert ids == [f"e{i}" for i in range(30)]
    finally:
        await mesh.stop(0)


async def test_queued_events_carry_the_event_as_sent_plus_ingest_time_and_producer(
    ingest: tuple[MeshServer, StreamLayout], pki_dir: Path, redis_client: aioredis.Redis
) -> None:
    # Ingest frames each queued event as bytes: it must decode to exactly the event the client
    # sent (every field), with the batch's ingest time, the producer, and the ingest time as
    # event time when the client set none.
    mesh, layout = ingest
    sent = [
        event_pb2.Event(
            id="full",
            key="k-full",
            type="order.created",
            payload=b'{"a":1}',
            content_type="application/cbor",
            attributes={"tenant": "t1", "ü": "ß"},
            event_time=Timestamp(seconds=1_700_000_000, nanos=123_000),
        ),
        event_pb2.Event(id="bare", key="k-bare", type="t"),
    ]
    channel, stub = _stub(mesh.port, pki_dir)
    async with channel:
        await stub.PublishBatch(
            ingest_pb2.PublishBatchRequest(events=sent, producer="user-9"), timeout=5
        )
    queued = {q.event.id: q for qs in (await _queued(redis_client, layout)).values() for q in qs}
    full, bare = queued["full"], queued["bare"]
    assert full.event == sent[0]
    assert (full.producer, bare.producer) == ("user-9", "user-9")
    assert full.ingest_time == bare.ingest_time and full.ingest_time.seconds > 1_700_000_000
    expected_bare = event_pb2.Event()
    expected_bare.CopyFrom(sent[1])
    expected_bare.event_time.CopyFrom(bare.ingest_time)
    assert bare.event == expected_bare
