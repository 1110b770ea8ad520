"""The ownership building blocks: a fair, stable, deterministic assignment; leases that only
one processor can hold, renew, release or acknowledge under; membership that forgets the dead."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import cast

import pytest
import redis.asyncio as aioredis

from services.processor.source.ownership import PartitionOwnership, assign
from streammesh.entries import Entry
from streammesh.streams import COLUMNS_FIELD, COUNT_FIELD
from tests.processor.conftest import append, make_layout


@pytest.mark.parametrize("partitions", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("members", [1, 2, 3, 5])
def test_assignment_is_fair_and_deterministic(partitions: int, members: int) -> None:
    names = [f"proc-{i}" for i in range(members)]
    owners = assign(partitions, names)
    assert sorted(owners) == list(range(partitions))
    loads = Counter(owners.values())
    assert max(loads.values()) - min(loads.get(n, 0) for n in names) <= 1
    assert assign(partitions, list(reversed(names))) == owners


@pytest.mark.parametrize("partitions", [4, 8, 16, 64])
@pytest.mark.parametrize("members", [1, 2, 3, 5])
def test_a_joining_member_moves_few_partitions(partitions: int, members: int) -> None:
    before = assign(partitions, [f"proc-{i}" for i in range(members)])
    after = assign(partitions, [f"proc-{i}" for i in range(members + 1)])
    moved = sum(before[p] != after[p] for p in range(partitions))
    # The newcomer's share has to move; sorted round-robin would move most partitions.
    assert moved <= 2 * math.ceil(partitions / (members + 1))


def test_no_members_no_owners() -> None:
    assert assign(4, []) == {}


async def test_a_lease_has_one_holder_until_released(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 4)
    a = PartitionOwnership(redis_client, layout, "a", lease_ttl_ms=5_000, heartbeat_ms=100)
    b = PartitionOwnership(redis_client, layout, "b", lease_ttl_ms=5_000, heartbeat_ms=100)
    assert await a.acquire([0, 1]) == [0, 1]
    assert await b.acquire([0, 1, 2]) == [2]
    assert await a.acquire([0]) == [0], "the holder may re-acquire (extend) its own lease"
    await b.release([0])  # not b's: the compare-and-delete leaves it alone
    assert await redis_client.get(layout.lease_key(0)) == b"a"
    await a.release([0])
    assert not a.holds(0)
    assert await b.acquire([0]) == [0]
    assert a.held() == {1} and b.held() == {0, 2}


async def test_renewal_and_ack_are_refused_after_the_lease_changed_hands(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    entry = await append(redis_client, layout, 0, ["x"])
    await redis_client.xreadgroup(layout.group, "a", {layout.stream(0): ">"})
    a = PartitionOwnership(redis_client, layout, "a", lease_ttl_ms=5_000, heartbeat_ms=100)
    assert await a.acquire([0]) == [0]
    # The lease expired (simulated) and another processor took it.
    await redis_client.set(layout.lease_key(0), "b", px=5_000)
    assert a.holds(0), "locally still trusted until a renewal or an ack says otherwise"
    assert not await a.ack(0, (entry, None))
    assert not a.holds(0)
    assert int((await redis_client.xpending(layout.stream(0), layout.group))["pending"]) == 1

    assert await a.acquire([0]) == []
    await redis_client.delete(layout.lease_key(0))
    assert await a.acquire([0]) == [0]
    await redis_client.set(layout.lease_key(0), "b", px=5_000)
    await a.heartbeat()
    assert not a.holds(0), "a refused renewal drops the partition at once"


async def test_one_ack_takes_more_entries_than_lua_unpacks_at_once(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """Lua's unpack() takes at most ~8000 values; a group of more entries (read_count and
    store_max_events allow 10,000 one-event entries) must still be acknowledged, its failed
    attempts forgotten with it, or the partition would be stored again and again."""
    layout = await make_layout(redis_client, redis_prefix, 1)
    attempts = f"{redis_prefix}attempts"
    owner = PartitionOwnership(
        redis_client, layout, "a", lease_ttl_ms=60_000, heartbeat_ms=100, forget=lambda _: attempts
    )
    assert await owner.acquire([0]) == [0]
    async with redis_client.pipeline(transaction=False) as pipe:
        for _ in range(9_000):
            pipe.xadd(layout.stream(0), {COLUMNS_FIELD: b"", COUNT_FIELD: b"1"})
        await pipe.execute()
    reply = await redis_client.xreadgroup(layout.group, "a", {layout.stream(0): ">"}, count=9_000)
    entries = cast(list[tuple[bytes, list[Entry]]], reply)[0][1]
    await redis_client.hset(attempts, mapping={entry_id: "1:0" for entry_id, _ in entries})
    assert await owner.ack(0, *entries)
    assert int((await redis_client.xpending(layout.stream(0), layout.group))["pending"]) == 0
    assert await redis_client.hlen(attempts) == 0


async def test_acks_of_several_partitions_are_fenced_each_by_its_own_lease(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 3)
    entries: list[Entry] = []
    for partition in range(3):
        entry_id = await append(redis_client, layout, partition, [f"e{partition}"])
        entries.append((entry_id, None))
        await redis_client.xreadgroup(layout.group, "a", {layout.stream(partition): ">"})
    a = PartitionOwnership(redis_client, layout, "a", lease_ttl_ms=5_000, heartbeat_ms=100)
    assert await a.acquire([0, 1, 2]) == [0, 1, 2]
    await redis_client.set(layout.lease_key(1), "b", px=5_000)  # 1 changed hands meanwhile
    acks = [(0, [entries[0]]), (1, [entries[1]]), (2, []), (2, [entries[2]])]
    assert await a.ack_many(acks) == [True, False, True, True]
    assert a.held() == {0, 2}
    pending = [
        int((await redis_client.xpending(layout.stream(p), layout.group))["pending"])
        for p in range(3)
    ]
    assert pending == [0, 1, 0], "only the partition whose lease names another kept its entry"


async def test_acks_of_several_partitions_run_after_redis_lost_the_script(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """The pipelined acks send EVALSHA only; a NOSCRIPT reply (Redis restarted, or its scripts
    flushed) means the ack did not run, and it runs again with the script loaded. Simulated
    with a digest Redis never saw, so that the shared Redis's scripts stay."""
    layout = await make_layout(redis_client, redis_prefix, 2)
    entries = []
    for partition in range(2):
        entry_id = await append(redis_client, layout, partition, [f"e{partition}"])
        entries.append((partition, [(entry_id, None)]))
        await redis_client.xreadgroup(layout.group, "a", {layout.stream(partition): ">"})
    a = PartitionOwnership(redis_client, layout, "a", lease_ttl_ms=5_000, heartbeat_ms=100)
    assert await a.acquire([0, 1]) == [0, 1]
    # What a client sees after Redis lost its scripts (private: no public way to get there).
    a._ack.sha = "0" * 40
    assert await a.ack_many(entries) == [True, True]
    for partition in range(2):
        summary = await redis_client.xpending(layout.stream(partition), layout.group)
        assert int(summary["pending"]) == 0


async def test_lease_expires_in_redis_after_the_local_deadline(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    a = PartitionOwnership(redis_client, layout, "a", lease_ttl_ms=300, heartbeat_ms=100)
    assert await a.acquire([0]) == [0]
    async with asyncio.timeout(2):
        while a.holds(0):
            await asyncio.sleep(0.01)
    # Locally given up first; Redis still names "a" for the rest of the margin.
    assert await redis_client.get(layout.lease_key(0)) == b"a"
    async with asyncio.timeout(2):
        while await redis_client.exists(layout.lease_key(0)):
            await asyncio.sleep(0.01)


async def test_membership_forgets_silent_members_and_reassigns(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 4)
    a = PartitionOwnership(redis_client, layout, "a", lease_ttl_ms=300, heartbeat_ms=100)
    b = PartitionOwnership(redis_client, layout, "b", lease_ttl_ms=300, heartbeat_ms=100)
    await a.heartbeat()
    await b.heartbeat()
    await a.heartbeat()
    members = a.members  # a local, or mypy keeps `a.members` narrowed past the next heartbeat
    assert members == ("a", "b")
    assert len(a.desired) == 2 and a.desired.isdisjoint(b.desired)
    await asyncio.sleep(0.35)  # b stops heartbeating
    await a.heartbeat()
    assert a.members == ("a",)
    assert a.desired == {0, 1, 2, 3}
    await a.leave()
    assert await redis_client.zrange(layout.members_key, 0, -1) == []
