"""Upgrading a running deployment to the hash-tagged key layout (streammesh/legacy_keys.py), on
the real Redis: the old keys with their data (entries, the consumer group and its pending list,
the lease with its expiry, the epoch, counters and attempts) move to the new names; an epoch
present under both names keeps the higher; an old stream with entries beside a new one with
entries refuses to start and moves nothing; a processor then serves the moved partition."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from services.processor.delivery.dead_letters import attempts_key
from services.processor.source.ownership import epoch_key
from services.processor.worker import StreamWorker, WorkerConfig
from streammesh.backlog import APPEND_SCRIPT
from streammesh.legacy_keys import LegacyKeysConflict, legacy_key, move_legacy_keys
from streammesh.streams import COLUMNS_FIELD, StreamLayout
from tests.processor.conftest import RecordingStore, drained, entry_columns, wait_for


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


def processor_keys(layout: StreamLayout) -> dict[str, Callable[[int], str]]:
    return {
        "epoch": lambda p: epoch_key(layout, p),
        "attempts": lambda p: attempts_key(layout, p),
    }


async def old_release_state(client: aioredis.Redis, layout: StreamLayout, partition: int) -> None:
    """What the previous release left: three entries (one pending under c-old), the group,
    counters, a lease, epoch 4 and an attempt count."""
    old = legacy_key(layout, "stream", partition)
    await client.xgroup_create(old, layout.group, id="0", mkstream=True)
    for n in range(3):
        body = entry_columns(partition, [f"old-{partition}-{n}"]).SerializeToString()
        await client.eval(
            APPEND_SCRIPT, 2, old, legacy_key(layout, "unacked", partition), body, 1, COLUMNS_FIELD
        )
    await client.xreadgroup(layout.group, "c-old", {old: ">"}, count=1)
    await client.set(legacy_key(layout, "lease", partition), "c-old", px=60_000)
    await client.set(legacy_key(layout, "epoch", partition), 4)
    await client.hset(legacy_key(layout, "attempts", partition), "1-0", "1:0")


async def test_old_keys_move_with_everything_they_hold(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=2)
    await old_release_state(client, layout, 1)
    await client.set(epoch_key(layout, 0), 2)  # a partition of the new layout: left alone

    kinds = processor_keys(layout)
    assert await move_legacy_keys(client, layout, kinds) == 5
    assert await client.exists(*(legacy_key(layout, k, 1) for k in [*kinds, "stream"])) == 0
    assert await client.xlen(layout.stream(1)) == 3
    pending = await client.xpending(layout.stream(1), layout.group)
    assert pending["pending"] == 1 and pending["consumers"][0]["name"] == b"c-old"
    assert await client.hget(layout.unacked_key(1), "events") == b"3"
    assert await client.get(layout.lease_key(1)) == b"c-old"
    assert 0 < await client.pttl(layout.lease_key(1)) <= 60_000
    assert await client.get(epoch_key(layout, 1)) == b"4"
    assert await client.hget(attempts_key(layout, 1), "1-0") == b"1:0"
    assert await client.get(epoch_key(layout, 0)) == b"2"
    assert await move_legacy_keys(client, layout, kinds) == 0


async def test_an_epoch_under_both_names_keeps_the_higher_and_an_empty_old_stream_goes(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=1)
    await layout.ensure_group(client)
    await client.xgroup_create(legacy_key(layout, "stream", 0), layout.group, mkstream=True)
    await client.set(legacy_key(layout, "epoch", 0), 9)
    await client.set(epoch_key(layout, 0), 3)
    assert await move_legacy_keys(client, layout, processor_keys(layout)) == 0
    assert await client.get(epoch_key(layout, 0)) == b"9"
    assert await client.exists(legacy_key(layout, "stream", 0), legacy_key(layout, "epoch", 0)) == 0


async def test_an_empty_new_stream_gives_way_to_the_old_one_with_entries(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """A start of this release created the new streams (empty) while the earlier release's
    ingest still appended to the old one: the old one, with its group, takes the name."""
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=1)
    await layout.ensure_group(client)
    await old_release_state(client, layout, 0)
    await move_legacy_keys(client, layout, processor_keys(layout))
    assert await client.xlen(layout.stream(0)) == 3
    assert (await client.xpending(layout.stream(0), layout.group))["pending"] == 1
    assert await client.exists(legacy_key(layout, "stream", 0)) == 0


async def test_entries_under_both_stream_names_refuse_the_start_and_move_nothing(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=1)
    await old_release_state(client, layout, 0)
    await client.xadd(layout.stream(0), {"cols": b"", "events": 0})
    with pytest.raises(LegacyKeysConflict) as refused:
        await move_legacy_keys(client, layout, processor_keys(layout))
    message = str(refused.value)
    assert f"both {legacy_key(layout, 'stream', 0)} (3 entries" in message
    assert f"and {layout.stream(0)} (1 entries)" in message
    assert "stop every ingest and processor of the earlier release" in message
    assert await client.xlen(legacy_key(layout, "stream", 0)) == 3
    assert await client.get(legacy_key(layout, "epoch", 0)) == b"4"
    assert await client.exists(epoch_key(layout, 0)) == 0


async def test_a_processor_starting_on_old_keys_moves_them_and_stores_every_entry(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=2)
    await old_release_state(client, layout, 0)
    await client.delete(legacy_key(layout, "lease", 0))  # the old processor stopped cleanly
    store = RecordingStore()
    config = WorkerConfig(read_count=8, block_ms=20, heartbeat_ms=50, claim_idle_ms=50)
    worker = StreamWorker(client, layout, consumer="c-new", store=store, config=config)
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: len(worker.ownership.held()) == 2, what="both partitions held")
        await wait_for(lambda: drained(client, layout), what="the moved partition drained")
        assert sorted(store.stored) == ["old-0-0", "old-0-1", "old-0-2"]
        assert worker.ownership.epoch(0) == 5  # the old epoch went on, not back to 1
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
