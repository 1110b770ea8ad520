"""The backlog counters against real Redis: counted with the append, subtracted once with the
fenced ack (acknowledged twice, dead-lettered, reclaimed), integers never below zero, corrected
exactly at takeover and to zero when drained; partitions trimmed by acknowledged volume."""

from __future__ import annotations

import dataclasses
from typing import cast

import pytest
import redis.asyncio as aioredis

from services.processor.delivery.store import PermanentStoreError, StoreResult
from services.processor.source import backlog as backlog_module
from services.processor.source.backlog import BacklogKeeper
from services.processor.source.ownership import PartitionOwnership
from services.processor.worker import StreamWorker
from streammesh.backlog import Backlog, entry_weight, read_backlog
from streammesh.entries import Entry, QueuedBody
from streammesh.streams import BATCH_FIELD, StreamLayout, body_bytes
from tests.conftest import StreamEntries, xrange_entries
from tests.processor.conftest import (
    FAST,
    ONE_OWNER,
    RecordingStore,
    Running,
    append,
    drained,
    make_layout,
    wait_for,
)


async def _counters(client: aioredis.Redis, layout: StreamLayout, partition: int) -> Backlog:
    return (await read_backlog(client, layout))[partition]


async def _raw_counters(
    client: aioredis.Redis, layout: StreamLayout, partition: int
) -> list[bytes | None]:
    """The fields as Redis holds them (to see that they are plain integers, never "-0")."""
    return cast(
        list[bytes | None], await client.hmget(layout.unacked_key(partition), ["events", "bytes"])
    )


def _weight(entries: list[Entry] | StreamEntries) -> Backlog:
    events = sum(entry_weight(fields)[0] for _, fields in entries)
    size = sum(entry_weight(fields)[1] for _, fields in entries)
    return Backlog(events=events, bytes=size)


async def _owner(client: aioredis.Redis, layout: StreamLayout, name: str) -> PartitionOwnership:
    owner = PartitionOwnership(client, layout, name, lease_ttl_ms=10_000, heartbeat_ms=100)
    assert await owner.acquire(range(layout.partitions)) == list(range(layout.partitions))
    return owner


async def _read(
    client: aioredis.Redis, layout: StreamLayout, consumer: str, count: int
) -> list[Entry]:
    reply = cast(
        list[tuple[bytes, list[Entry]]] | None,
        await client.xreadgroup(layout.group, consumer, {layout.stream(0): ">"}, count=count),
    )
    return reply[0][1] if reply else []


async def test_the_append_counts_and_the_ack_subtracts_each_entry_once(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 2)
    await append(redis_client, layout, 0, ["a", "b", "c"])
    await append(redis_client, layout, 0, ["d"])
    await append(redis_client, layout, 1, ["e", "f"])
    entries = await xrange_entries(redis_client, layout.stream(0))
    batch_bytes = [body_bytes(fields) for _, fields in entries]
    assert await _counters(redis_client, layout, 0) == Backlog(events=4, bytes=sum(batch_bytes))
    assert (await _counters(redis_client, layout, 1)).events == 2

    owner = await _owner(redis_client, layout, "c1")
    first, second = await _read(redis_client, layout, "c1", 10)
    assert await owner.ack(0, first)
    assert await owner.ack(0, first)  # acknowledged twice: subtracted once
    assert await owner.ack(0, first, second)  # the first again, with the second
    assert await _counters(redis_client, layout, 0) == Backlog()
    assert await _raw_counters(redis_client, layout, 0) == [b"0", b"0"]
    assert (await _counters(redis_client, layout, 1)).events == 2  # untouched


async def test_counters_stay_integers_and_never_go_below_zero(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """An entry appended around the script (by hand: never counted) is subtracted at its ack;
    the counters stop at zero instead of going negative, and hold plain integers."""
    layout = await make_layout(redis_client, redis_prefix, 1)
    await append(redis_client, layout, 0, ["counted"])
    await redis_client.xadd(layout.stream(0), {BATCH_FIELD: b"x" * 5000, "events": 7})
    owner = await _owner(redis_client, layout, "c1")
    entries = await _read(redis_client, layout, "c1", 10)
    assert await owner.ack(0, *entries)
    assert await _raw_counters(redis_client, layout, 0) == [b"0", b"0"]
    # A deleted entry (no fields) weighs nothing: nothing to subtract, and no error.
    await append(redis_client, layout, 0, ["gone"])
    [(entry_id, fields)] = await _read(redis_client, layout, "c1", 10)
    await redis_client.xdel(layout.stream(0), entry_id)
    assert await owner.ack(0, (entry_id, None))
    assert await _counters(redis_client, layout, 0) == _weight([(entry_id, fields)])


async def test_a_dead_letter_and_a_reclaimed_entry_are_subtracted_once(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    """A crashed processor's entries, taken over by another, and an entry set aside as a dead
    letter: after the drain the counters are exactly zero, not clamped from below (a counted
    entry appended last and never read keeps its weight in them)."""
    layout = await make_layout(redis_client, redis_prefix, 1)
    for name in ("e0", "poison", "e2", "e3"):
        await append(redis_client, layout, 0, [name, f"{name}-b"])
    await _read(redis_client, layout, "crashed", 2)  # e0 and poison, pending under "crashed"

    class Store(RecordingStore):
        async def __call__(self, body: QueuedBody) -> StoreResult:
            if body.batch().events[0].event.id == "poison":
                raise PermanentStoreError("INVALID_ARGUMENT: bad")
            return await super().__call__(body)

    store = Store()
    worker = running.start(
        StreamWorker(redis_client, layout, consumer="c1", store=store, config=ONE_OWNER)
    )
    await wait_for(lambda: drained(redis_client, layout), what="drained")
    await running.stop("c1")
    assert worker.stats.dead_lettered == 1
    assert sorted(store.stored) == ["e0", "e0-b", "e2", "e2-b", "e3", "e3-b"]
    assert await _counters(redis_client, layout, 0) == Backlog()
    assert worker.stats.backlog_corrections == 0, "the counters had no drift to correct"
    last = await append(redis_client, layout, 0, ["last"])
    [(_, fields)] = [
        e for e in await xrange_entries(redis_client, layout.stream(0)) if e[0] == last
    ]
    assert await _counters(redis_client, layout, 0) == _weight([(last, fields)])


async def test_takeover_makes_drifted_counters_exact(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """Acknowledged, pending (of another consumer) and undelivered entries; counters thrown
    off by an XACK and an XADD done around the scripts, and by a wrong value set by hand: the
    reconcile counts exactly the pending and undelivered ones."""
    layout = await make_layout(redis_client, redis_prefix, 1)
    for n in range(6):
        await append(redis_client, layout, 0, [f"e{n}"] * (n + 1))
    old = await _owner(redis_client, layout, "old")
    read = await _read(redis_client, layout, "old", 4)
    assert await old.ack(0, read[0])  # acknowledged through the script
    await redis_client.xack(layout.stream(0), layout.group, read[1][0])  # around it
    await redis_client.xadd(layout.stream(0), {BATCH_FIELD: b"y" * 300, "events": 2})  # around
    await old.release([0])
    unacked = [read[2], read[3], *(await xrange_entries(redis_client, layout.stream(0)))[4:]]
    truth = _weight(unacked)
    assert await _counters(redis_client, layout, 0) != truth

    keeper = BacklogKeeper(redis_client, layout, "new")
    await _owner(redis_client, layout, "new")
    counted = await _counters(redis_client, layout, 0)
    drift = await keeper.reconcile(0)
    assert drift == Backlog(events=truth.events - counted.events, bytes=truth.bytes - counted.bytes)
    assert await _counters(redis_client, layout, 0) == truth
    assert await keeper.reconcile(0) == Backlog(), "exact: a second pass finds nothing"

    await redis_client.hset(layout.unacked_key(0), mapping={"events": 10**9, "bytes": 5})
    await keeper.reconcile(0)
    assert await _counters(redis_client, layout, 0) == truth
    # Only while it holds the lease: another owner's partition is left alone.
    await redis_client.set(layout.lease_key(0), "someone-else")
    await redis_client.hset(layout.unacked_key(0), "events", 1)
    assert await keeper.reconcile(0) == Backlog()
    assert (await _counters(redis_client, layout, 0)).events == 1


async def test_takeover_of_an_empty_or_unknown_partition(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=1)
    keeper = BacklogKeeper(redis_client, layout, "new")
    await redis_client.set(layout.lease_key(0), "new")
    await redis_client.hset(layout.unacked_key(0), mapping={"events": 3, "bytes": 30})
    assert await keeper.reconcile(0) == Backlog(events=-3, bytes=-30)  # no stream at all
    await append(redis_client, layout, 0, ["a"])  # a stream without the group
    assert await keeper.reconcile(0) == Backlog()
    assert (await _counters(redis_client, layout, 0)).events == 1


async def test_a_drained_partition_has_its_counters_zeroed(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    keeper = BacklogKeeper(redis_client, layout, "c1")
    owner = await _owner(redis_client, layout, "c1")
    await append(redis_client, layout, 0, ["a"])
    assert await keeper.reset_if_drained(0) is None, "undelivered: not drained"
    entries = await _read(redis_client, layout, "c1", 10)
    assert await keeper.reset_if_drained(0) is None, "pending: not drained"
    assert await owner.ack(0, *entries)
    assert await keeper.reset_if_drained(0) == Backlog()

    # A phantom backlog: an undelivered entry deleted by hand. Redis cannot compute the lag
    # then (None); the last-delivered id against the stream's last id says drained.
    await append(redis_client, layout, 0, ["b"])
    deleted = await append(redis_client, layout, 0, ["c"])
    entries = await _read(redis_client, layout, "c1", 1)
    assert await owner.ack(0, *entries)
    await redis_client.xdel(layout.stream(0), deleted)
    [group] = await redis_client.xinfo_groups(layout.stream(0))
    assert group["lag"] is None and group["pending"] == 0
    phantom = await _counters(redis_client, layout, 0)
    assert phantom.events == 1
    assert await keeper.reset_if_drained(0) == phantom
    assert await _raw_counters(redis_client, layout, 0) == [b"0", b"0"]


async def test_the_worker_corrects_a_phantom_backlog_while_it_runs(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 2)
    config = dataclasses.replace(FAST, trim_interval_seconds=0.05)
    worker = running.start(
        StreamWorker(redis_client, layout, consumer="c1", store=RecordingStore(), config=config)
    )
    await wait_for(lambda: worker.stats.takeovers == 2, what="both partitions taken")
    assert worker.stats.backlog_corrections == 0
    # After the takeover's reconcile: only the drained check can see this one.
    await redis_client.hset(layout.unacked_key(1), mapping={"events": 500, "bytes": 9000})
    await wait_for(lambda: worker.stats.backlog_corrections >= 1, what="a correction")
    assert await _counters(redis_client, layout, 1) == Backlog()
    await append(redis_client, layout, 1, ["x"])
    await wait_for(lambda: drained(redis_client, layout), what="drained")
    await running.stop("c1")
    assert await _counters(redis_client, layout, 1) == Backlog()


@pytest.mark.parametrize("after_bytes", [1, 0])
async def test_partitions_are_trimmed_by_acknowledged_volume(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running, after_bytes: int
) -> None:
    """With trim_after_bytes, acknowledged entries go long before the trim interval; without,
    they wait for it."""
    layout = await make_layout(redis_client, redis_prefix, 1)
    config = dataclasses.replace(FAST, trim_interval_seconds=3600, trim_after_bytes=after_bytes)
    running.start(
        StreamWorker(redis_client, layout, consumer="c1", store=RecordingStore(), config=config)
    )
    await wait_for(lambda: drained(redis_client, layout), what="drained (empty)")
    for n in range(5):
        await append(redis_client, layout, 0, [f"e{n}"])
    await wait_for(lambda: drained(redis_client, layout), what="drained")
    if after_bytes:
        await wait_for(
            lambda: _length_is(redis_client, layout, 0), what="trimmed by volume", limit=5
        )
    await running.stop("c1")
    length = await redis_client.xlen(layout.stream(0))
    assert length == (0 if after_bytes else 5)


async def _length_is(client: aioredis.Redis, layout: StreamLayout, length: int) -> bool:
    return int(await client.xlen(layout.stream(0))) == length


async def test_a_backlog_too_long_to_read_is_left_to_the_drained_check(
    redis_client: aioredis.Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    for n in range(3):
        await append(redis_client, layout, 0, [f"e{n}"])
    await redis_client.hset(layout.unacked_key(0), "events", 99)
    await _owner(redis_client, layout, "c1")
    monkeypatch.setattr(backlog_module, "MAX_RECONCILE_BYTES", 10)
    keeper = BacklogKeeper(redis_client, layout, "c1")
    assert await keeper.reconcile(0) == Backlog()
    assert (await _counters(redis_client, layout, 0)).events == 99
    monkeypatch.undo()
    assert (await keeper.reconcile(0)).events == 3 - 99
