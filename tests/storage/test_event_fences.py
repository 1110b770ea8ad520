"""Fencing at storage (issue 11): StoreEvents carries the sender's lease epoch per partition, and
storage refuses one below the highest it committed for that partition, with everything in the
request. Real Postgres schema, the real storage server over mTLS, and the processor's own
storage client (two of them: the old owner's and the new owner's), and at the end a real worker
on real Redis whose store is held past its lease while the new owner stores."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.processor.delivery.dead_letters import attempts_key
from services.processor.delivery.storage_client import StorageWriter, storage_client
from services.processor.delivery.store import StaleLeaseEpoch, StoreResult
from services.processor.source.ownership import PartitionOwnership
from services.processor.worker import StreamWorker, WorkerConfig
from streammesh.api.storage.v1 import definitions_pb2, storage_pb2
from streammesh.entries import QueuedBody
from streammesh.mesh import MeshServer
from streammesh.streams import COLUMNS_FIELD
from tests.processor.conftest import append, entry_columns, make_layout, wait_for
from tests.storage.conftest import Stub, queued
from tests.storage.test_store_partitions import several

STREAM = "smtest:events"


def body(partition: int, ids: list[str], *fences: tuple[int, int]) -> QueuedBody:
    """An entry's events as the processor sends them, fenced by (partition, epoch)s."""
    data = entry_columns(partition, ids).SerializeToString()
    return QueuedBody(COLUMNS_FIELD, data, tuple((STREAM, p, e) for p, e in fences))


@pytest.fixture
async def writers(server: MeshServer, pki_dir: Path) -> AsyncIterator[list[StorageWriter]]:
    """Two processors' storage clients (the old owner's and the new owner's)."""
    clients = [
        storage_client(f"127.0.0.1:{server.port}", pki_dir, timeout_seconds=5) for _ in range(2)
    ]
    yield [StorageWriter(client) for client in clients]
    for client in clients:
        await client.close()


async def stored_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return [row[0] for row in await conn.execute(text("SELECT id FROM events ORDER BY seq"))]


async def fences(engine: AsyncEngine) -> dict[tuple[str, int], int]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT stream, partition, lease_epoch FROM event_fences"))
        return {(row[0], row[1]): row[2] for row in rows}


async def test_the_old_owners_store_after_the_new_owners_is_refused_and_writes_nothing(
    writers: list[StorageWriter], engine: AsyncEngine
) -> None:
    old, new = writers
    assert await old.store(body(3, ["a1"], (3, 1))) == StoreResult(1, 0)
    assert await new.store(body(3, ["b1"], (3, 2))) == StoreResult(1, 0)
    with pytest.raises(StaleLeaseEpoch) as refused:
        await old.store(body(3, ["a2", "a3"], (3, 1)))
    assert refused.value.stored_epoch == 2
    with pytest.raises(StaleLeaseEpoch):  # refused as well when every event is stored already
        await old.store(body(3, ["a1", "b1"], (3, 1)))
    assert "lease epoch 1 is older than the stored epoch 2" in str(refused.value)
    assert str(refused.value).startswith("FAILED_PRECONDITION: events of smtest:events partition 3")
    assert await stored_ids(engine) == ["a1", "b1"]
    assert await fences(engine) == {(STREAM, 3): 2}
    # The new owner goes on, at its epoch and the ones after; other partitions are their own.
    assert await new.store(body(3, ["b2"], (3, 2))) == StoreResult(1, 0)
    assert await old.store(body(4, ["c1"], (4, 1))) == StoreResult(1, 0)
    assert await new.store(body(3, ["b3", "b1"], (3, 3))) == StoreResult(1, 1)
    assert await stored_ids(engine) == ["a1", "b1", "b2", "c1", "b3"]
    assert await fences(engine) == {(STREAM, 3): 3, (STREAM, 4): 1}


async def test_a_request_without_fences_is_stored_as_before(
    writers: list[StorageWriter], engine: AsyncEngine
) -> None:
    """Wire compatibility: a processor of an earlier release sends no fences (unfenced)."""
    old, new = writers
    assert await new.store(body(0, ["n1"], (0, 5))) == StoreResult(1, 0)
    assert await old.store(body(0, ["u1"])) == StoreResult(1, 0)
    assert await stored_ids(engine) == ["n1", "u1"]
    assert await fences(engine) == {(STREAM, 0): 5}


async def test_one_stale_partition_refuses_a_call_across_partitions_whole(
    processor: Stub, engine: AsyncEngine
) -> None:
    fence = definitions_pb2.PartitionFence
    await processor.StoreEvents(
        storage_pb2.StoreEventsRequest(
            columns=entry_columns(1, ["x0"]),
            fences=[fence(stream=STREAM, partition=1, lease_epoch=4)],
        ),
        timeout=5,
    )
    request = several((0, [queued("a", event_id="y1")]), (1, [queued("b", event_id="y2")]))
    request.fences.extend(
        [
            fence(stream=STREAM, partition=0, lease_epoch=9),
            fence(stream=STREAM, partition=1, lease_epoch=3),
        ]
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await processor.StoreEvents(request, timeout=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "partition 1: lease epoch 3 is older than the stored epoch 4" in (
        refused.value.details() or ""
    )
    assert await stored_ids(engine) == ["x0"]
    assert await fences(engine) == {(STREAM, 1): 4}  # partition 0's raise was rolled back too


MALFORMED = [
    ([(STREAM, 0, 0)], "fences[0]: lease_epoch must be between 1 and"),
    ([("", 0, 1)], "fences[0]: stream is empty"),
    ([(STREAM, 2**31, 1)], "fences[0]: partition 2147483648 is above"),
    ([(STREAM, 0, 1), (STREAM, 0, 2)], "fences[1]: partition 0 of smtest:events is fenced"),
]


async def test_a_malformed_fence_is_invalid_argument(processor: Stub, engine: AsyncEngine) -> None:
    for fences_given, problem in MALFORMED:
        request = storage_pb2.StoreEventsRequest(columns=entry_columns(0, ["z1"]))
        for stream, partition, epoch in fences_given:
            request.fences.add(stream=stream, partition=partition, lease_epoch=epoch)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await processor.StoreEvents(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").startswith(problem), problem
    assert await stored_ids(engine) == []


PAUSED = WorkerConfig(
    read_count=8,
    block_ms=20,
    heartbeat_ms=50,
    lease_ttl_ms=400,
    trim_interval_seconds=0,
    store_across_max_events=0,
    retry_backoff_seconds=0.05,
)


async def test_a_worker_paused_past_its_lease_loses_the_partition_without_ack_or_dead_letter(
    writers: list[StorageWriter],
    engine: AsyncEngine,
    redis_url: str,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Worker A's store of entry E is held (a pause) while its lease is taken from it and the
    new owner B stores at the next epoch; released, A's store is refused: E is not written, A
    drops the partition, acknowledges nothing, counts no failure and dead-letters nothing."""
    client = aioredis.Redis.from_url(redis_url)
    layout = await make_layout(client, redis_prefix, 1)
    old, new = writers
    held, entered = asyncio.Event(), asyncio.Event()
    refusals: list[BaseException] = []

    async def paused_store(raw: QueuedBody) -> StoreResult:
        entered.set()
        await held.wait()
        try:
            return await old.store(raw)
        except StaleLeaseEpoch as error:
            refusals.append(error)
            raise

    worker = StreamWorker(client, layout, consumer="a", store=paused_store, config=PAUSED)
    task = asyncio.create_task(worker.run())
    try:
        entry_id = await append(client, layout, 0, ["e1"])
        await asyncio.wait_for(entered.wait(), 10)
        assert worker.ownership.last_epoch(0) == 1
        # The pause outlives the lease: it is gone (A's renewal then fails), B takes it.
        await client.delete(layout.lease_key(0))
        b = PartitionOwnership(client, layout, "b", lease_ttl_ms=60_000, heartbeat_ms=1_000)
        assert await b.acquire([0]) == [0]
        assert b.epoch(0) == 2
        data = entry_columns(0, ["b1"]).SerializeToString()
        assert await new.store(QueuedBody(COLUMNS_FIELD, data, ((layout.prefix, 0, 2),)))
        await wait_for(lambda: not worker.ownership.holds(0), what="A dropped the lease")
        with caplog.at_level(logging.WARNING):
            held.set()
            await wait_for(lambda: bool(refusals), what="A's store refused")
            await wait_for(lambda: "fenced out by storage" in caplog.text, what="A's log")
        assert isinstance(refusals[0], StaleLeaseEpoch) and refusals[0].stored_epoch == 2
        assert await stored_ids(engine) == ["b1"]
        summary = await client.xpending(layout.stream(0), layout.group)
        assert summary["pending"] == 1 and summary["min"] == entry_id  # not acknowledged
        assert worker.stats.dead_lettered == 0 and worker.stats.counted_failures == 0
        assert await client.hlen(attempts_key(layout, 0)) == 0
        assert await client.xlen(layout.dead_letter_stream) == 0
    finally:
        worker.stop()
        await asyncio.wait({task}, timeout=5)
        task.cancel()
        await client.aclose()


async def test_an_epoch_redis_lost_moves_past_storages_fence_on_the_next_acquire(
    writers: list[StorageWriter], engine: AsyncEngine, redis_url: str, redis_prefix: str
) -> None:
    """Redis restarted without its data: the partition's epoch counter starts at 1 again while
    storage's fence is at 7. The refused owner drops the partition, and its next acquire moves
    the epoch past the fence (under its lease), so its stores go through again."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        layout = await make_layout(client, redis_prefix, 1)
        writer, _ = writers
        data = entry_columns(0, ["before"]).SerializeToString()
        await writer.store(QueuedBody(COLUMNS_FIELD, data, ((layout.prefix, 0, 7),)))
        owner = PartitionOwnership(client, layout, "a", lease_ttl_ms=60_000, heartbeat_ms=1_000)
        assert await owner.acquire([0]) == [0] and owner.epoch(0) == 1
        data = entry_columns(0, ["after"]).SerializeToString()
        with pytest.raises(StaleLeaseEpoch) as refused:
            await writer.store(QueuedBody(COLUMNS_FIELD, data, ((layout.prefix, 0, 1),)))
        owner.fenced_out(0, refused.value.stored_epoch, str(refused.value))
        assert not owner.holds(0)
        assert await owner.acquire([0]) == [0] and owner.epoch(0) == 8
        await writer.store(QueuedBody(COLUMNS_FIELD, data, ((layout.prefix, 0, 8),)))
        assert await stored_ids(engine) == ["before", "after"]
    finally:
        await client.aclose()
