"""Trimming removes acknowledged entries only: never one still pending, never one not yet
delivered to every group, and none younger than the retention."""

from __future__ import annotations

import redis.asyncio as aioredis

from services.processor.source.trimming import format_id, parse_id, safe_trim_point, trim_partition
from tests.conftest import xrange_entries
from tests.processor.conftest import append, make_layout


async def _ids(client: aioredis.Redis, stream: str) -> list[bytes]:
    return [entry_id for entry_id, _ in await xrange_entries(client, stream)]


async def test_pending_and_undelivered_entries_survive_a_trim(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    stream = layout.stream(0)
    ids = [await append(redis_client, layout, 0, [f"e{n}"]) for n in range(6)]
    await redis_client.xreadgroup(layout.group, "c", {stream: ">"}, count=4)  # e0..e3 pending
    await redis_client.xack(stream, layout.group, ids[0], ids[1])

    assert await trim_partition(redis_client, stream) == 2
    assert await _ids(redis_client, stream) == ids[2:]

    # e3 acknowledged but e2 still pending: e3 stays (MINID trims a prefix only).
    await redis_client.xack(stream, layout.group, ids[3])
    assert await trim_partition(redis_client, stream) == 0
    assert await _ids(redis_client, stream) == ids[2:]
    rows = await redis_client.xpending_range(stream, layout.group, "-", "+", 10)
    assert [row["message_id"] for row in rows] == [ids[2]]

    # Everything delivered is acknowledged: only the undelivered e4, e5 remain.
    await redis_client.xack(stream, layout.group, ids[2])
    assert await trim_partition(redis_client, stream) == 2
    assert await _ids(redis_client, stream) == ids[4:]


async def test_every_group_on_the_stream_is_respected(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    stream = layout.stream(0)
    ids = [await append(redis_client, layout, 0, [f"e{n}"]) for n in range(3)]
    await redis_client.xgroup_create(stream, "analytics", id="0")
    await redis_client.xreadgroup(layout.group, "c", {stream: ">"}, count=10)
    await redis_client.xack(stream, layout.group, *ids)
    assert await trim_partition(redis_client, stream) == 0, "analytics has read nothing yet"
    await redis_client.xreadgroup("analytics", "a", {stream: ">"}, count=1)
    await redis_client.xack(stream, "analytics", ids[0])
    assert await trim_partition(redis_client, stream) == 1
    assert await _ids(redis_client, stream) == ids[1:]


async def test_retention_keeps_recent_acknowledged_entries(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    stream = layout.stream(0)
    ids = [await append(redis_client, layout, 0, [f"e{n}"]) for n in range(3)]
    await redis_client.xreadgroup(layout.group, "c", {stream: ">"}, count=10)
    await redis_client.xack(stream, layout.group, *ids)
    assert await trim_partition(redis_client, stream, retention_seconds=60) == 0
    assert await trim_partition(redis_client, stream) == 3


async def test_nothing_to_trim_without_a_stream_or_a_group(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    assert await safe_trim_point(redis_client, f"{redis_prefix}missing") is None
    await redis_client.xadd(f"{redis_prefix}lonely", {"a": 1})
    assert await trim_partition(redis_client, f"{redis_prefix}lonely") == 0
    assert await redis_client.xlen(f"{redis_prefix}lonely") == 1


def test_entry_ids_round_trip() -> None:
    assert parse_id(b"1700000000000-7") == (1700000000000, 7)
    assert format_id(parse_id("5-0")) == "5-0"
