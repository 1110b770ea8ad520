"""Fixtures and helpers for the processor tests: a private stream layout, a recording store, a
publisher that appends through ingest's own appender, and bounded waiting."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from services.processor.delivery.store import StoreResult
from services.processor.worker import StreamWorker, WorkerConfig
from streammesh.api.common.v1 import event_pb2
from streammesh.backlog import APPEND_SCRIPT
from streammesh.entries import QueuedBody, columns_to_batch, expand_runs
from streammesh.mesh.tasks import stop_task
from streammesh.streams import BATCH_FIELD, COLUMNS_FIELD, StreamLayout

FAST = WorkerConfig(
    read_count=8,
    block_ms=50,
    claim_idle_ms=60_000,
    retry_backoff_seconds=0.05,
    lease_ttl_ms=400,
    heartbeat_ms=50,
    trim_interval_seconds=0,
    store_max_events=1,
)
"""Small timings for tests; reclaiming is off in practice (60 s) unless a test lowers it. One
entry per store call, so that tests can gate, fail and count single entries; grouping has its
own tests (test_worker.py)."""

ONE_OWNER = dataclasses.replace(FAST, lease_ttl_ms=10_000)
"""FAST for a test whose only worker must keep its partitions: with a 400 ms lease, an event loop
starved on a loaded machine lets the lease lapse, and the entry in hand is then stored once more
(a legitimate redelivery) before it is acknowledged or set aside, one more attempt than a test
that counts attempts exactly expects. Heartbeats stay as frequent as in FAST."""


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def make_layout(client: aioredis.Redis, prefix: str, partitions: int) -> StreamLayout:
    layout = StreamLayout(prefix=f"{prefix}events", partitions=partitions)
    await layout.ensure_group(client)
    return layout


async def append(
    client: aioredis.Redis,
    layout: StreamLayout,
    partition: int,
    ids: list[str],
    key: str = "k",
    *,
    form: bytes = COLUMNS_FIELD,
) -> bytes:
    """Append an entry of events `ids` in the form ingest writes (QueuedColumns), or with
    `form=BATCH_FIELD` as earlier releases did (QueuedBatch)."""
    if form == BATCH_FIELD:
        batch = event_pb2.QueuedBatch(partition=partition)
        for event_id in ids:
            batch.events.add().event.CopyFrom(event_pb2.Event(id=event_id, key=key, type="t"))
        body = batch.SerializeToString()
    else:
        body = entry_columns(partition, ids, key).SerializeToString()
    # As ingest appends: the XADD and the backlog counters in one script.
    entry_id = await client.eval(
        APPEND_SCRIPT,
        2,
        layout.stream(partition),
        layout.unacked_key(partition),
        body,
        len(ids),
        form,
    )
    assert isinstance(entry_id, bytes)  # the client does not decode responses
    return entry_id


def entry_columns(partition: int, ids: list[str], key: str = "k") -> event_pb2.QueuedColumns:
    """An entry's events as ingest writes them: one run (one ingest time and producer)."""
    count = len(ids)
    return event_pb2.QueuedColumns(
        ids=ids,
        keys=[key] * count,
        types=["t"] * count,
        payloads=[b""] * count,
        content_types=[""] * count,
        attributes=["{}"] * count,
        event_time_micros=[0] * count,
        event_time_nanos=[0] * count,
        ingest_time_micros=[0],
        producers=[""],
        run_lengths=[count],
        partition=partition,
    )


@dataclass
class StoreCall:
    consumer: str
    partition: int
    events: list[tuple[str, str]]
    """(key, id) in batch order."""


@dataclass
class RecordingStore:
    """Stores into a list; fails while `failures_left` > 0; `delay` makes each call take time
    (so a crash can land mid-store); `gate`, if set for an event id, holds that call."""

    consumer: str = ""
    failures_left: int = 0
    delay: float = 0.0
    calls: list[StoreCall] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    entered: set[str] = field(default_factory=set)
    across: list[list[int]] = field(default_factory=list)
    """The partitions of each successful call that carried several partitions' entries."""

    @property
    def stored(self) -> list[str]:
        return [event_id for call in self.calls for _, event_id in call.events]

    def for_consumer(self, consumer: str) -> Callable[[QueuedBody], Awaitable[StoreResult]]:
        async def store(raw: QueuedBody) -> StoreResult:
            return await self._store(consumer, raw)

        return store

    async def __call__(self, raw: QueuedBody) -> StoreResult:
        """What the worker calls: the entry's serialized batch, as storage gets it."""
        return await self._store(self.consumer, raw)

    async def _store(self, consumer: str, raw: QueuedBody) -> StoreResult:
        """Record the call; one carrying several partitions' entries (`run_partitions`, as
        storage reads it) is recorded as one StoreCall per partition and in `across`."""
        if self.failures_left > 0:
            self.failures_left -= 1
            raise ConnectionError("storage down")
        columns = event_pb2.QueuedColumns.FromString(raw.data) if raw.columnar else None
        batch = columns_to_batch(columns) if columns is not None else raw.batch()
        first = batch.events[0].event.id
        self.entered.add(first)
        gate = self.gates.get(first)
        if gate is not None:
            await gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if columns is None or not columns.run_partitions:
            self.calls.append(
                StoreCall(
                    consumer, batch.partition, [(q.event.key, q.event.id) for q in batch.events]
                )
            )
            return StoreResult(inserted=len(batch.events), duplicates=0)
        assert len(columns.run_partitions) == len(columns.run_lengths), "one partition per run"
        partitions = expand_runs(columns.run_partitions, columns.run_lengths)
        self.across.append(list(dict.fromkeys(columns.run_partitions)))
        rows_of = zip(partitions, batch.events, strict=True)
        for partition, rows in itertools.groupby(rows_of, lambda row: row[0]):
            self.calls.append(
                StoreCall(consumer, partition, [(q.event.key, q.event.id) for _, q in rows])
            )
        return StoreResult(inserted=len(batch.events), duplicates=0)


async def wait_for(
    condition: Callable[[], Awaitable[bool] | bool], *, limit: float = 10, what: str = ""
) -> None:
    """Poll `condition` every 10 ms for at most `limit` seconds."""
    async with asyncio.timeout(limit):
        while True:
            result = condition()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await asyncio.sleep(0.01)


async def pending(client: aioredis.Redis, layout: StreamLayout) -> int:
    total = 0
    for stream in layout.streams():
        total += int((await client.xpending(stream, layout.group))["pending"])
    return total


async def undelivered(client: aioredis.Redis, layout: StreamLayout) -> int:
    total = 0
    for stream in layout.streams():
        for group in await client.xinfo_groups(stream):
            total += int(group["lag"] or 0)
    return total


async def drained(client: aioredis.Redis, layout: StreamLayout) -> bool:
    """Every entry of every partition was delivered to the group and acknowledged.

    One XINFO GROUPS reply per stream gives both numbers at the same instant. Asking XPENDING
    and then the lag does not: a read between the two moves entries from the lag into the
    pending list, and both answers say 0 while those entries are still being stored. A lag
    Redis cannot compute (None, after an XDEL) counts as not drained, not as 0."""
    for stream in layout.streams():
        for group in await client.xinfo_groups(stream):
            if group["name"] not in (layout.group, layout.group.encode()):
                continue
            if int(group["pending"]) or group["lag"] is None or int(group["lag"]):
                return False
    return True


class Running:
    """Workers started as tasks; `stop` is graceful, `crash` cancels (no release)."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.workers: dict[str, StreamWorker] = {}

    def start(self, worker: StreamWorker) -> StreamWorker:
        self.workers[worker.consumer] = worker
        self.tasks[worker.consumer] = asyncio.create_task(worker.run())
        return worker

    async def stop(self, name: str) -> None:
        self.workers[name].stop()
        await asyncio.wait_for(self.tasks.pop(name), 5)
        del self.workers[name]

    async def crash(self, name: str) -> None:
        assert await stop_task(self.tasks.pop(name)), f"worker {name} did not stop"
        del self.workers[name]

    async def stop_all(self) -> None:
        for name in list(self.tasks):
            await self.stop(name)


@pytest.fixture
async def running(redis_client: aioredis.Redis) -> AsyncIterator[Running]:
    """Workers of one test; whatever is still running at the end is cancelled before the Redis
    client closes."""
    workers = Running()
    try:
        yield workers
    finally:
        for task in workers.tasks.values():
            task.cancel()
        for task in workers.tasks.values():
            await stop_task(task)
