"""The engine wired into the worker, with real Redis and a real storage server over mTLS: lease
epochs, the commit order (outputs fenced per batch, entries acknowledged only once a saved
checkpoint covers them), a crash and a takeover whose stored outputs equal a reference run of
PartitionEngine over the stream, a rule created at runtime that alerts within 2 s, and the
no-definitions path that decodes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.processor.definition_follower import DefinitionFollower, DefinitionStub
from services.processor.delivery.dead_letters import attempts_key
from services.processor.delivery.engine_outputs import outputs_request
from services.processor.delivery.engine_storage import EngineStorage
from services.processor.delivery.storage_client import StorageWriter, storage_client
from services.processor.engine.clock import ClockConfig
from services.processor.engine.events import EngineEvent
from services.processor.engine.partition import PartitionEngine, PartitionOutputs
from services.processor.processing.committer import EngineConfig
from services.processor.source.ownership import epoch_key
from services.processor.worker import EngineSetup, StreamWorker
from streammesh.api.common.v1 import definitions_pb2 as common
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import definitions_pb2 as pb
from streammesh.backlog import APPEND_SCRIPT
from streammesh.definitions.rules import parse_rule
from streammesh.definitions.window_defs import parse_window_def
from streammesh.mesh import MeshServer, TlsMaterial
from streammesh.streams import COLUMNS_FIELD, StreamLayout
from tests.processor.conftest import ONE_OWNER, Running, make_layout, wait_for
from tests.storage.conftest import engine, server, start_server
from tests.storage.test_engine_checkpoints import expected, stored

__all__ = ["engine", "server", "start_server"]  # storage's fixtures, used here

CLOCK = ClockConfig(out_of_orderness_nanos=5_000, idle_timeout_nanos=3600 * 10**9)
WINDOWS: list[dict[str, Any]] = [
    {
        "id": "per-10us",
        "event_type": "reading",
        "kind": "tumbling",
        "size": "10us",
        "aggregates": [
            {"name": "n", "fn": "count"},
            {"name": "total", "fn": "sum", "field": "payload.v"},
        ],
    },
    {
        "id": "by-g",
        "event_type": "reading",
        "kind": "hopping",
        "size": "20us",
        "step": "10us",
        "group_by": "payload.g",
        "aggregates": [{"name": "n", "fn": "count"}],
    },
]
RULES: list[dict[str, Any]] = [
    {
        "id": "hot",
        "kind": "threshold",
        "match": {"type": "reading"},
        "field": "payload.v",
        "op": "gt",
        "value": 8,
    },
    {
        "id": "a-then-b",
        "kind": "sequence",
        "steps": [{"type": "reading"}, {"type": "alarm"}],
        "within": "30us",
    },
]


@dataclasses.dataclass
class Events:
    """What a test appended, per partition in stream order (the reference's input)."""

    by_partition: dict[int, list[EngineEvent]] = dataclasses.field(default_factory=dict)

    async def append(
        self, client: aioredis.Redis, layout: StreamLayout, partition: int, events: list[Any]
    ) -> bytes:
        """Append one entry (QueuedColumns as ingest writes it) of (id, key, type, time ns,
        payload) events."""
        columns = event_pb2.QueuedColumns(
            ids=[e[0] for e in events],
            keys=[e[1] for e in events],
            types=[e[2] for e in events],
            payloads=[json.dumps(e[4]).encode() for e in events],
            content_types=[""] * len(events),
            attributes=["{}"] * len(events),
            event_time_micros=[e[3] // 1000 for e in events],
            event_time_nanos=[e[3] % 1000 for e in events],
            ingest_time_micros=[1],
            producers=["p"],
            run_lengths=[len(events)],
            partition=partition,
        )
        entry_id = await client.eval(
            APPEND_SCRIPT,
            2,
            layout.stream(partition),
            layout.unacked_key(partition),
            columns.SerializeToString(),
            len(events),
            COLUMNS_FIELD,
        )
        self.by_partition.setdefault(partition, []).extend(
            EngineEvent(e[0], e[1], e[2], e[3], partition, "default", e[4]) for e in events
        )
        assert isinstance(entry_id, bytes)
        return entry_id

    def reference(self) -> list[PartitionOutputs]:
        """PartitionEngine run purely over every partition's events in stream order."""
        windows = [parse_window_def({"version": 1, "tenant": "default", **w}) for w in WINDOWS]
        rules = [parse_rule({"version": 1, "tenant": "default", **r}) for r in RULES]
        outs = []
        for partition, events in sorted(self.by_partition.items()):
            reference = PartitionEngine(partition, CLOCK, windows, rules)
            outs.append(reference.process(events, 0))
        return outs


def readings(run: str, start: int, count: int, key: str, t0: int) -> list[Any]:
    """`count` events of one key, 1 us apart, with a few hot values, an alarm every 7th."""
    return [
        (
            f"{run}-{n}",
            key,
            "alarm" if n % 7 == 6 else "reading",
            t0 + n * 1000,
            {"v": (n * 5) % 11, "g": "xy"[n % 2]},
        )
        for n in range(start, start + count)
    ]


@dataclasses.dataclass
class Storage:
    port: int
    pki_dir: Path
    gateway: Any


@pytest.fixture
async def storage(server: MeshServer, pki_dir: Path) -> AsyncIterator[Storage]:
    found = Storage(server.port, pki_dir, None)
    async with storage_stub(found, "gateway") as gateway:
        found.gateway = gateway
        yield found


async def define(storage: Storage, windows: list[Any], rules: list[Any]) -> None:
    for kind, documents in (
        (common.DEFINITION_KIND_WINDOW, windows),
        (common.DEFINITION_KIND_RULE, rules),
    ):
        for document in documents:
            await storage.gateway.CreateDefinition(
                pb.CreateDefinitionRequest(
                    tenant="default",
                    kind=kind,
                    created_by="ada",
                    definition_json=json.dumps(document),
                )
            )


@pytest.fixture
async def make_worker(
    storage: Storage, redis_client: aioredis.Redis
) -> AsyncIterator[Callable[..., StreamWorker]]:
    """Workers with the engine on, each with its own storage channels and follower."""
    closers: list[Any] = []
    tasks: list[asyncio.Task[None]] = []
    target = f"127.0.0.1:{storage.port}"

    def build(
        layout: StreamLayout, consumer: str, *, claim_idle_ms: int = 60_000, **engine: Any
    ) -> StreamWorker:
        client = storage_client(target, storage.pki_dir, timeout_seconds=5)
        writer = StorageWriter(client)
        channel = client.channel
        follower = DefinitionFollower(client.stub(DefinitionStub), poll_interval=0.2)
        tasks.append(asyncio.create_task(follower.run()))
        closers.append(client.close)
        config = EngineConfig(clock=CLOCK, **({"checkpoint_seconds": 3600.0} | engine))
        return StreamWorker(
            redis_client,
            layout,
            consumer=consumer,
            store=writer.store,
            dead_letters=writer.record_dead_letter,
            config=dataclasses.replace(
                ONE_OWNER, store_max_events=2000, read_count=4, claim_idle_ms=claim_idle_ms
            ),
            engine=EngineSetup(EngineStorage(channel), follower, config),
        )

    yield build
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for close in closers:
        await close()


async def pending(client: aioredis.Redis, layout: StreamLayout, partition: int) -> int:
    summary = await client.xpending(layout.stream(partition), layout.group)
    return int(summary["pending"])


async def test_lease_epochs_grow_with_every_new_owner(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    from services.processor.source.ownership import PartitionOwnership

    layout = await make_layout(redis_client, redis_prefix, 2)
    first = PartitionOwnership(redis_client, layout, "a", lease_ttl_ms=1000, heartbeat_ms=100)
    second = PartitionOwnership(redis_client, layout, "b", lease_ttl_ms=1000, heartbeat_ms=100)
    assert await first.acquire([0, 1]) == [0, 1]
    assert (first.epoch(0), first.epoch(1)) == (1, 1)
    assert await first.acquire([0]) == [0] and first.epoch(0) == 1  # ours already: unchanged
    assert await second.acquire([0]) == [] and second.epoch(0) == 0
    await first.release([0])
    assert first.epoch(0) == 0
    assert await second.acquire([0]) == [0] and second.epoch(0) == 2
    # The same consumer name in a new process (not holding it in memory) is a new owner too.
    again = PartitionOwnership(redis_client, layout, "b", lease_ttl_ms=1000, heartbeat_ms=100)
    assert await again.acquire([0]) == [0] and again.epoch(0) == 3
    assert await redis_client.get(epoch_key(layout, 0)) == b"3"
    # Redis lost the counter (a restart without its data): storage's fence moves it up.
    await redis_client.set(epoch_key(layout, 0), 1)
    assert await again.raise_epoch(0, 7) == 7 and again.epoch(0) == 7
    assert await second.raise_epoch(1, 9) == 0  # not the lease holder: unchanged


async def test_entries_are_acknowledged_only_once_a_checkpoint_covers_them(
    redis_client: aioredis.Redis,
    redis_prefix: str,
    storage: Storage,
    engine: AsyncEngine,
    make_worker: Callable[..., StreamWorker],
    running: Running,
) -> None:
    await define(storage, WINDOWS, RULES)
    layout = await make_layout(redis_client, redis_prefix, 1)
    events = Events()
    worker = running.start(make_worker(layout, "w1", checkpoint_batches=3))
    committer = worker.committer
    assert committer is not None
    for n in range(2):  # one batch each
        await events.append(redis_client, layout, 0, readings("r", n * 10, 10, "k", 10**9))
        want = 10 * (n + 1)
        await wait_for(lambda: committer.events_processed == want, what="processed")  # noqa: B023
    # Processed, their outputs stored, but no checkpoint yet: still pending.
    assert committer.checkpoints == 0 and await pending(redis_client, layout, 0) == 2
    await events.append(redis_client, layout, 0, readings("r", 20, 10, "k", 10**9))
    await wait_for(lambda: committer.checkpoints == 1, what="the third batch's checkpoint")
    await wait_for_async(lambda: pending(redis_client, layout, 0), 0)
    async with engine.connect() as conn:
        row = (
            await conn.execute(text("SELECT lease_epoch, last_entry_id FROM engine_checkpoints"))
        ).one()
    assert row.lease_epoch == 1 and row.last_entry_id
    # A graceful stop saves the state of what came after, and acknowledges it.
    await events.append(redis_client, layout, 0, readings("r", 30, 10, "k", 10**9))
    await wait_for(lambda: committer.events_processed == 40, what="the fourth batch")
    await running.stop("w1")
    assert await pending(redis_client, layout, 0) == 0
    assert committer.checkpoints == 2


async def wait_for_async(read: Callable[[], Any], want: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := await read()) != want:
        assert time.monotonic() < deadline, f"got {got}, wanted {want}"
        await asyncio.sleep(0.02)


async def test_a_crash_and_a_takeover_store_the_reference_outputs_once(
    redis_client: aioredis.Redis,
    redis_prefix: str,
    storage: Storage,
    engine: AsyncEngine,
    make_worker: Callable[..., StreamWorker],
    running: Running,
) -> None:
    await define(storage, WINDOWS, RULES)
    layout = await make_layout(redis_client, redis_prefix, 2)
    events = Events()
    first = running.start(make_worker(layout, "w1", checkpoint_batches=4))
    first_committer = first.committer
    assert first_committer is not None

    async def publish(start: int, stop: int, wait: bool) -> None:
        for n in range(start, stop, 6):
            for p in range(2):
                await events.append(
                    redis_client, layout, p, readings(f"p{p}", n, 6, f"k{p}", 10**9)
                )
            if wait:  # one batch per entry
                want = 2 * (n + 6)
                await wait_for(lambda: first_committer.events_processed == want)  # noqa: B023

    await publish(0, 60, wait=True)
    await running.crash("w1")  # mid-window and mid-pattern: state past the checkpoint is lost
    assert first_committer.checkpoints == 4  # after batches 4 and 8 of each partition
    uncovered = await pending_total(redis_client, layout)
    assert uncovered > 0, "the crash should leave processed entries to replay"
    await publish(60, 90, wait=False)
    # A tick far ahead in event time on each partition closes every window and pattern (the
    # reference reads it too), instead of idleness, which depends on processing time.
    ends = [
        (await events.append(redis_client, layout, p, [(f"end-{p}", "z", "tick", 2 * 10**9, {})]))
        for p in range(2)
    ]
    # The crashed worker's lease and membership lapse (at once here, instead of after the TTL).
    await redis_client.zrem(layout.members_key, "w1")
    await redis_client.delete(*(layout.lease_key(p) for p in range(2)))
    second = running.start(make_worker(layout, "w2", checkpoint_batches=4))
    second_committer = second.committer
    assert second_committer is not None
    await wait_for(
        lambda: [second_committer.position(p).encode() for p in range(2)] == ends, limit=20
    )
    await running.stop("w2")  # its last checkpoint covers the rest: nothing stays pending
    assert await pending_total(redis_client, layout) == 0
    final = await stored(engine)
    want = expected(events.reference())
    assert final == want
    assert want["alerts"] and want["results"]
    assert second.stats.takeovers == 2
    async with engine.connect() as conn:
        epochs = (await conn.execute(text("SELECT lease_epoch FROM engine_checkpoints"))).scalars()
        assert set(epochs) == {2}


async def pending_total(client: aioredis.Redis, layout: StreamLayout) -> int:
    return sum([await pending(client, layout, p) for p in range(layout.partitions)])


async def test_a_rule_created_at_runtime_alerts_within_two_seconds(
    redis_client: aioredis.Redis,
    redis_prefix: str,
    storage: Storage,
    engine: AsyncEngine,
    make_worker: Callable[..., StreamWorker],
    running: Running,
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    events = Events()
    worker = running.start(make_worker(layout, "w1"))
    assert worker.committer is not None
    await events.append(redis_client, layout, 0, readings("before", 0, 10, "k", 10**9))
    await wait_for_async(lambda: pending(redis_client, layout, 0), 0)
    # No definitions: acknowledged at once, nothing decoded.
    assert worker.committer.events_processed == 0
    created = time.monotonic()
    await define(storage, [], [RULES[0] | {"activation": 0}])
    seen = None
    n = 0
    while seen is None:
        assert time.monotonic() - created < 5, "no alert 5 s after the rule was created"
        now_ns = time.time_ns()
        await events.append(
            redis_client, layout, 0, [(f"hot-{n}", "k", "reading", now_ns, {"v": 9})]
        )
        n += 1
        await asyncio.sleep(0.05)
        async with engine.connect() as conn:
            if (await conn.execute(text("SELECT count(*) FROM alerts"))).scalar_one():
                seen = time.monotonic() - created
    print(f"\n[definitions] rule created -> first alert stored: {seen * 1000:.0f} ms")
    assert seen < 2.0


async def test_a_new_owner_acknowledges_what_the_checkpoint_covers_without_processing_it(
    redis_client: aioredis.Redis,
    redis_prefix: str,
    storage: Storage,
    engine: AsyncEngine,
    make_worker: Callable[..., StreamWorker],
    running: Running,
) -> None:
    """The old owner saved a checkpoint after entry 10 and died before its XACK: 10 entries
    covered and still pending (more than one read), then 6 it never processed."""
    await define(storage, WINDOWS, RULES)
    layout = await make_layout(redis_client, redis_prefix, 1)
    events = Events()
    ids = [
        await events.append(redis_client, layout, 0, readings("r", n * 5, 5, "k", 10**9))
        for n in range(16)
    ]
    await redis_client.xreadgroup(layout.group, "dead", {layout.stream(0): ">"}, count=100)
    covered = events.by_partition[0][:50]
    old = PartitionEngine(0, CLOCK, *reference_definitions())
    old_outputs = old.process(covered, 0, last_entry_id=ids[9].decode())
    async with storage_stub(storage, "processor") as stub:
        await stub.StoreEngineOutputs(
            outputs_request(
                old_outputs,
                checkpoint=pb.EngineCheckpoint(
                    stream=layout.prefix,
                    partition=0,
                    lease_epoch=1,
                    last_entry_id=old.last_entry_id,
                    snapshot=old.snapshot(),
                ),
            )
        )
    await redis_client.set(epoch_key(layout, 0), 1)  # the dead owner's epoch
    end = await events.append(redis_client, layout, 0, [("end", "z", "tick", 2 * 10**9, {})])
    worker = running.start(make_worker(layout, "w2", checkpoint_batches=2))
    committer = worker.committer
    assert committer is not None
    await wait_for(lambda: committer.position(0).encode() == end, limit=10)
    await running.stop("w2")
    assert committer.events_processed == 31  # 6 entries of 5 after the checkpoint, and the end
    assert await pending(redis_client, layout, 0) == 0
    assert await stored(engine) == expected(events.reference())


def reference_definitions() -> tuple[list[Any], list[Any]]:
    return (
        [parse_window_def({"version": 1, "tenant": "default", **w}) for w in WINDOWS],
        [parse_rule({"version": 1, "tenant": "default", **r}) for r in RULES],
    )


@contextlib.asynccontextmanager
async def storage_stub(storage: Storage, who: str) -> AsyncIterator[Any]:
    from streammesh.api.storage.v1 import definitions_pb2_grpc as pb_grpc
    from streammesh.mesh import create_channel, service_config

    channel = create_channel(
        f"127.0.0.1:{storage.port}",
        TlsMaterial.load(storage.pki_dir, who),
        server_name="storage",
        config=service_config("streammesh.storage.v1.DefinitionService", health_checked=False),
    )
    async with channel:
        yield pb_grpc.DefinitionServiceStub(channel)


async def test_processed_entries_waiting_for_a_checkpoint_are_not_reclaimed_as_stale(
    redis_client: aioredis.Redis,
    redis_prefix: str,
    storage: Storage,
    make_worker: Callable[..., StreamWorker],
    running: Running,
) -> None:
    await define(storage, WINDOWS, RULES)
    layout = await make_layout(redis_client, redis_prefix, 1)
    events = Events()
    worker = running.start(make_worker(layout, "w1", claim_idle_ms=200))
    committer = worker.committer
    assert committer is not None
    for n in range(3):
        await events.append(redis_client, layout, 0, readings("r", n * 10, 10, "k", 10**9))
    await wait_for(lambda: committer.events_processed == 30)
    stored_before = worker.stats.batches_stored
    await asyncio.sleep(1.0)  # five idle periods: the reclaim ran several times
    assert worker.stats.entries_claimed == 0
    assert worker.stats.batches_stored == stored_before  # not read and stored again
    assert await pending(redis_client, layout, 0) == 3  # still waiting for the checkpoint
    assert await redis_client.hlen(attempts_key(layout, 0)) == 0
    await running.stop("w1")
    assert await pending(redis_client, layout, 0) == 0


async def test_an_epoch_redis_lost_is_moved_past_storage_fence(
    redis_client: aioredis.Redis,
    redis_prefix: str,
    storage: Storage,
    engine: AsyncEngine,
    make_worker: Callable[..., StreamWorker],
    running: Running,
) -> None:
    """Redis came back without its data: its epoch counter starts again below the fence that
    storage keeps. The owner (the Redis lease names it) raises its epoch past the fence."""
    await define(storage, WINDOWS, RULES)
    layout = await make_layout(redis_client, redis_prefix, 1)
    async with storage_stub(storage, "processor") as stub:
        await stub.LoadEngineCheckpoint(
            pb.LoadEngineCheckpointRequest(stream=layout.prefix, partition=0, lease_epoch=5)
        )
    events = Events()
    worker = running.start(make_worker(layout, "w1", checkpoint_batches=1))
    committer = worker.committer
    assert committer is not None
    await events.append(redis_client, layout, 0, readings("r", 0, 10, "k", 10**9))
    await wait_for(lambda: committer.checkpoints == 1)
    assert worker.ownership.epoch(0) == 6
    assert await redis_client.get(epoch_key(layout, 0)) == b"6"
    await wait_for_async(lambda: pending(redis_client, layout, 0), 0)
    async with engine.connect() as conn:
        epoch = (await conn.execute(text("SELECT lease_epoch FROM engine_checkpoints"))).scalar()
    assert epoch == 6
