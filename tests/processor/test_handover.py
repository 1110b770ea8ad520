"""Partition ownership end to end: several workers on one group, with handovers while events
flow. Per-key order must survive a processor joining, leaving gracefully and crashing; a
worker that lost its lease must not store or acknowledge further entries of the partition; a new
owner first finishes the previous owner's pending entries."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import redis.asyncio as aioredis

from services.ingest.queue import StreamAppender
from services.processor.worker import StreamWorker
from streammesh.api.common.v1 import event_pb2
from streammesh.streams import StreamLayout
from tests.processor.conftest import (
    FAST,
    RecordingStore,
    Running,
    append,
    drained,
    make_layout,
    pending,
    undelivered,
    wait_for,
)

KEYS = [f"key-{i}" for i in range(16)]


class Publisher:
    """Publishes batches through ingest's appender; remembers the publish order per key."""

    def __init__(self, client: aioredis.Redis, layout: StreamLayout) -> None:
        self._appender = StreamAppender(client, layout)
        self.order: dict[str, list[str]] = defaultdict(list)
        self.count = 0

    async def publish(self, batches: int, *, size: int = 8, pause: float = 0.005) -> None:
        for _ in range(batches):
            events = []
            for _ in range(size):
                key = KEYS[self.count % len(KEYS)]
                events.append(event_pb2.Event(id=f"e{self.count}", key=key, type="t"))
                self.order[key].append(f"e{self.count}")
                self.count += 1
            await self._appender.append(events, producer="test")
            await asyncio.sleep(pause)


class ExclusivityMonitor:
    """Samples every 5 ms that no partition is held by two live workers at once."""

    def __init__(self, running: Running, partitions: int) -> None:
        self._running = running
        self._partitions = partitions
        self.violations: list[tuple[int, list[str]]] = []
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            for partition in range(self._partitions):
                holders = [
                    name
                    for name, w in self._running.workers.items()
                    if w.ownership.holds(partition)
                ]
                if len(holders) > 1:
                    self.violations.append((partition, holders))
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _settled(running: Running, partitions: int) -> bool:
    """Every partition held by exactly one live worker, and each worker by its assignment."""
    held = [w.ownership.held() for w in running.workers.values()]
    return (
        sum(len(h) for h in held) == partitions
        and set().union(*held) == set(range(partitions))
        and all(w.ownership.held() == w.ownership.desired for w in running.workers.values())
    )


def _check_order(store: RecordingStore, publisher: Publisher, *, duplicates: bool) -> None:
    """The effective store (first insert of an id wins, as in storage) holds every event once,
    in publish order per key; repeats only where allowed."""
    seen: set[str] = set()
    per_key: dict[str, list[str]] = defaultdict(list)
    repeats = 0
    for call in store.calls:
        for key, event_id in call.events:
            if event_id in seen:
                repeats += 1
                continue
            seen.add(event_id)
            per_key[key].append(event_id)
    assert per_key == publisher.order
    assert duplicates or repeats == 0, f"{repeats} events stored twice"


async def _all_done(
    client: aioredis.Redis, layout: StreamLayout, store: RecordingStore, n: int
) -> bool:
    return len(set(store.stored)) == n and await drained(client, layout)


def _worker(
    client: aioredis.Redis, layout: StreamLayout, store: RecordingStore, name: str
) -> StreamWorker:
    return StreamWorker(client, layout, consumer=name, store=store.for_consumer(name), config=FAST)


async def test_two_workers_split_partitions_and_a_third_joins(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 4)
    store = RecordingStore(delay=0.001)
    for name in ("w1", "w2"):
        running.start(_worker(redis_client, layout, store, name))
    monitor = ExclusivityMonitor(running, 4)
    await wait_for(lambda: _settled(running, 4), what="two workers settle")
    assert sorted(len(w.ownership.held()) for w in running.workers.values()) == [2, 2]

    publisher = Publisher(redis_client, layout)
    publishing = asyncio.create_task(publisher.publish(60))
    await asyncio.sleep(0.1)
    running.start(_worker(redis_client, layout, store, "w3"))
    await publishing
    await wait_for(lambda: _all_done(redis_client, layout, store, publisher.count))
    await wait_for(lambda: _settled(running, 4))
    assert sorted(len(w.ownership.held()) for w in running.workers.values()) == [1, 1, 2]
    assert any(call.consumer == "w3" for call in store.calls), "w3 took over a partition"
    await monitor.close()
    await running.stop_all()
    assert monitor.violations == []
    _check_order(store, publisher, duplicates=False)
    assert await pending(redis_client, layout) == 0


async def test_a_worker_leaving_gracefully_hands_over_in_order(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 4)
    store = RecordingStore(delay=0.001)
    for name in ("w1", "w2"):
        running.start(_worker(redis_client, layout, store, name))
    monitor = ExclusivityMonitor(running, 4)
    await wait_for(lambda: _settled(running, 4))
    w2_partitions = running.workers["w2"].ownership.held()

    publisher = Publisher(redis_client, layout)
    publishing = asyncio.create_task(publisher.publish(60))
    await asyncio.sleep(0.12)
    await running.stop("w2")
    assert await redis_client.zrange(layout.members_key, 0, -1) == [b"w1"]
    await publishing
    await wait_for(lambda: _all_done(redis_client, layout, store, publisher.count))
    assert running.workers["w1"].ownership.held() == {0, 1, 2, 3}
    moved = {(c.consumer, c.partition) for c in store.calls if c.partition in w2_partitions}
    assert {consumer for consumer, _ in moved} == {"w1", "w2"}
    await monitor.close()
    await running.stop_all()
    assert monitor.violations == []
    _check_order(store, publisher, duplicates=False)


async def test_a_crashed_worker_is_replaced_after_its_leases_expire(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 4)
    store = RecordingStore(delay=0.002)
    for name in ("w1", "w2"):
        running.start(_worker(redis_client, layout, store, name))
    await wait_for(lambda: _settled(running, 4))
    w2_partitions = running.workers["w2"].ownership.held()

    publisher = Publisher(redis_client, layout)
    publishing = asyncio.create_task(publisher.publish(60))
    await wait_for(lambda: any(c.consumer == "w2" for c in store.calls))
    # Crash: no release, no leaving; the leases and membership stay until they expire.
    await running.crash("w2")
    crashed_at = asyncio.get_running_loop().time()
    monitor = ExclusivityMonitor(running, 4)
    assert await redis_client.exists(*(layout.lease_key(p) for p in w2_partitions)) == len(
        w2_partitions
    )
    await publishing
    await wait_for(lambda: _all_done(redis_client, layout, store, publisher.count))
    assert running.workers["w1"].ownership.held() == {0, 1, 2, 3}
    takeover = [c for c in store.calls if c.consumer == "w1" and c.partition in w2_partitions]
    assert takeover, "w1 stored the crashed worker's partitions"
    assert asyncio.get_running_loop().time() - crashed_at >= FAST.lease_ttl_ms / 1000 * 0.8
    await monitor.close()
    await running.stop_all()
    assert monitor.violations == []
    _check_order(store, publisher, duplicates=True)
    assert await pending(redis_client, layout) == 0


async def test_a_worker_that_lost_its_lease_stores_and_acks_nothing_more(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    await append(redis_client, layout, 0, ["x"])
    await append(redis_client, layout, 0, ["y"])
    store = RecordingStore()
    store.gates["x"] = asyncio.Event()
    worker = running.start(_worker(redis_client, layout, store, "w1"))
    await wait_for(lambda: "x" in store.entered)
    # x is being stored (y is already read, in w1's hands) when another processor takes the
    # lease (as if w1 had been paused past its TTL).
    await redis_client.set(layout.lease_key(0), "w2", px=60_000)
    store.gates["x"].set()
    await wait_for(lambda: not worker.ownership.holds(0))
    await append(redis_client, layout, 0, ["z"])
    await asyncio.sleep(0.3)  # several heartbeats and rounds
    assert store.stored == ["x"], "the store in flight finishes; nothing after it starts"
    rows = await redis_client.xpending_range(layout.stream(0), layout.group, "-", "+", 10)
    assert [row["consumer"] for row in rows] == [b"w1", b"w1"], "x and y stay pending"
    assert await undelivered(redis_client, layout) == 1, "z is not even read"
    await running.stop("w1")
    assert await redis_client.get(layout.lease_key(0)) == b"w2", "w2's lease is left alone"


async def test_the_new_owner_finishes_the_old_owners_pending_entries_first(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    for name in ("a", "b", "c"):
        await append(redis_client, layout, 0, [name])
    # The old owner read a..c, stored none, and died holding the lease.
    await redis_client.xreadgroup(layout.group, "old", {layout.stream(0): ">"}, count=10)
    await redis_client.set(layout.lease_key(0), "old", px=300)
    for name in ("d", "e"):
        await append(redis_client, layout, 0, [name])
    store = RecordingStore()
    worker = running.start(_worker(redis_client, layout, store, "new"))
    await asyncio.sleep(0.15)
    assert store.stored == [], "the old owner's lease is still alive"
    await wait_for(lambda: _all_done(redis_client, layout, store, 5))
    assert store.stored == ["a", "b", "c", "d", "e"]
    assert worker.stats.takeovers == 1
    await running.stop("new")


async def test_a_late_read_of_the_previous_owner_is_claimed_before_newer_entries(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    store = RecordingStore()
    store.gates["e0"] = asyncio.Event()
    running.start(_worker(redis_client, layout, store, "new"))
    await append(redis_client, layout, 0, ["e0"])
    await wait_for(lambda: "e0" in store.entered)
    # While "new" stores e0, a blocking read of the previous owner returns late with e1.
    await append(redis_client, layout, 0, ["e1"])
    await redis_client.xreadgroup(layout.group, "old", {layout.stream(0): ">"}, count=1)
    await append(redis_client, layout, 0, ["e2"])
    store.gates["e0"].set()
    await wait_for(lambda: _all_done(redis_client, layout, store, 3))
    assert store.stored == ["e0", "e1", "e2"]
    await running.stop("new")
