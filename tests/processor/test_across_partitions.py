"""The worker's store across partitions: the leading groups of the partitions a round read go
to storage in as few calls as the limits allow (one QueuedColumns with a partition per run); a
failure other than an outage sends them partition by partition, so that only the entry at fault
counts; an outage keeps them all for the retry; old-form entries stay partition by partition."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable

import redis.asyncio as aioredis

from services.processor.delivery.across import NO_PARTITION, across_body
from services.processor.delivery.store import PermanentStoreError, StoreResult
from services.processor.source import ownership as ownership_module
from services.processor.worker import StreamWorker, WorkerConfig
from streammesh.api.common.v1 import event_pb2
from streammesh.backlog import Backlog, read_backlog
from streammesh.entries import Entry, QueuedBody
from streammesh.streams import BATCH_FIELD, COLUMNS_FIELD, COUNT_FIELD, StreamLayout
from tests.processor.conftest import (
    ONE_OWNER,
    RecordingStore,
    Running,
    append,
    entry_columns,
    make_layout,
    pending,
    wait_for,
)

CONFIG = dataclasses.replace(ONE_OWNER, store_max_events=3, store_across_max_events=3)


def worker(
    client: aioredis.Redis,
    layout: StreamLayout,
    store: RecordingStore,
    config: WorkerConfig = CONFIG,
) -> StreamWorker:
    return StreamWorker(client, layout, consumer="c1", store=store, config=config)


async def settle(
    client: aioredis.Redis, layout: StreamLayout, store: RecordingStore, count: int
) -> None:
    async def settled() -> bool:
        return len(store.stored) >= count and await pending(client, layout) == 0

    await wait_for(settled)


async def test_one_round_of_several_partitions_shares_calls_within_the_limits(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 4)
    await append(redis_client, layout, 0, ["a1", "a2"], key="a")
    await append(redis_client, layout, 0, ["a3", "a4"], key="a")
    for partition, event_id in [(1, "b1"), (2, "c1"), (3, "d1")]:
        await append(redis_client, layout, partition, [event_id], key=event_id)
    store = RecordingStore()
    running.start(worker(redis_client, layout, store))
    await settle(redis_client, layout, store, 7)
    await running.stop("c1")
    # At most 3 events per call: partition 0's first entry with partition 1's, partitions 2
    # and 3 in a second call beside it, then partition 0's second entry, which fit neither.
    assert sorted(store.across) == [[0, 1], [2, 3]]
    assert [len(call.events) for call in store.calls if call.partition == 0] == [2, 2]
    assert [i for i in store.stored if i.startswith("a")] == ["a1", "a2", "a3", "a4"]
    assert sorted(store.stored) == ["a1", "a2", "a3", "a4", "b1", "c1", "d1"]
    # Every entry acknowledged once: the back-pressure counters are back to nothing.
    assert await read_backlog(redis_client, layout) == [Backlog()] * 4


class AckCounter(aioredis.Connection):
    """A real connection that counts the writes carrying the fenced ack (the ACK script's
    EVALSHA): `sends` writes to Redis, `calls` scripts in them."""

    sha = (
        hashlib.sha1(ownership_module.ACK_SCRIPT.encode(), usedforsecurity=False)
        .hexdigest()
        .encode()
    )
    sends = calls = 0

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        packed = command.encode() if isinstance(command, str) else command
        data = packed if isinstance(packed, bytes) else b"".join(packed)
        if self.sha in data:
            AckCounter.sends += 1
            AckCounter.calls += data.count(self.sha)
        await super().send_packed_command(command, check_health)


async def test_the_partitions_of_a_call_are_acknowledged_in_one_round_trip(
    redis_url: str, redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    """Each partition's fenced ack is its own script (its own lease checked), but the acks of
    one call across partitions go to Redis together."""
    layout = await make_layout(redis_client, redis_prefix, 8)
    for partition in range(8):
        await append(redis_client, layout, partition, [f"e{partition}"])
    counting = aioredis.Redis.from_url(redis_url, connection_class=AckCounter)
    AckCounter.sends = AckCounter.calls = 0
    try:
        wide = dataclasses.replace(ONE_OWNER, store_across_max_events=500)
        store = RecordingStore()
        running.start(StreamWorker(counting, layout, consumer="c1", store=store, config=wide))
        await settle(redis_client, layout, store, 8)
        await running.stop("c1")
    finally:
        await counting.aclose()
    assert store.across == [list(range(8))]
    assert (AckCounter.calls, AckCounter.sends) == (8, 1)
    assert await read_backlog(redis_client, layout) == [Backlog()] * 8


async def test_a_refused_call_across_partitions_is_retried_partition_by_partition(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 3)
    for partition, event_id in enumerate(["g1", "bad", "g2"]):
        await append(redis_client, layout, partition, [event_id])

    class Refusing(RecordingStore):
        async def __call__(self, raw: QueuedBody) -> StoreResult:
            if any(q.event.id == "bad" for q in raw.batch().events):
                raise PermanentStoreError("INVALID_ARGUMENT: bad")
            return await super().__call__(raw)

    store = Refusing()
    started = running.start(worker(redis_client, layout, store))
    await settle(redis_client, layout, store, 2)
    await running.stop("c1")
    assert store.across == []
    assert sorted(store.stored) == ["g1", "g2"]
    # Only the bad entry counted, and it went to dead letters as before.
    assert started.stats.dead_lettered == 1 and started.stats.counted_failures == 1
    assert await read_backlog(redis_client, layout) == [Backlog()] * 3


async def test_an_outage_across_partitions_keeps_every_entry_for_the_retry(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 3)
    for partition in range(3):
        await append(redis_client, layout, partition, [f"e{partition}"])
    store = RecordingStore(failures_left=1)
    started = running.start(worker(redis_client, layout, store))
    await settle(redis_client, layout, store, 3)
    await running.stop("c1")
    assert store.across == [[0, 1, 2]]
    assert sorted(store.stored) == ["e0", "e1", "e2"]
    assert started.stats.counted_failures == 0 and started.stats.store_failures == 1


async def test_old_form_entries_are_not_stored_across_partitions(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 3)
    await append(redis_client, layout, 0, ["old0"], form=BATCH_FIELD)
    await append(redis_client, layout, 1, ["new1"])
    await append(redis_client, layout, 2, ["new2"])
    store = RecordingStore()
    running.start(worker(redis_client, layout, store))
    await settle(redis_client, layout, store, 3)
    await running.stop("c1")
    assert store.across == [[1, 2]]
    assert [(c.partition, c.events) for c in store.calls if c.partition == 0] == [
        (0, [("k", "old0")])
    ]


async def test_no_call_across_partitions_when_turned_off(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 3)
    for partition in range(3):
        await append(redis_client, layout, partition, [f"e{partition}"])
    store = RecordingStore()
    off = dataclasses.replace(CONFIG, store_across_max_events=0)
    running.start(worker(redis_client, layout, store, off))
    await settle(redis_client, layout, store, 3)
    await running.stop("c1")
    assert store.across == []
    assert sorted((c.partition, c.events[0][1]) for c in store.calls) == [
        (0, "e0"),
        (1, "e1"),
        (2, "e2"),
    ]


def _entry(partition: int, ids: list[str]) -> Entry:
    columns = entry_columns(partition, ids)
    return b"0-1", {COLUMNS_FIELD: columns.SerializeToString(), COUNT_FIELD: str(len(ids)).encode()}


def test_the_body_across_partitions_carries_the_partition_of_every_run() -> None:
    chunk = [(4, [_entry(4, ["a", "b"]), _entry(4, ["c"])]), (0, [_entry(0, ["d"])])]
    body = across_body(chunk)
    assert body.columnar
    merged = event_pb2.QueuedColumns.FromString(body.data)
    assert list(merged.ids) == ["a", "b", "c", "d"]
    assert list(merged.run_lengths) == [2, 1, 1]
    assert list(merged.run_partitions) == [4, 4, 0]
    assert merged.partition == NO_PARTITION  # refused by a storage that ignores run_partitions
