"""The `drained` helper that tests wait on: true only once every entry was delivered to the
group and acknowledged, whatever moment a worker's read lands at."""

from __future__ import annotations

import redis.asyncio as aioredis

from tests.processor.conftest import append, drained, make_layout


async def test_drained_means_delivered_and_acknowledged(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 2)
    assert await drained(redis_client, layout)  # nothing appended yet
    first = await append(redis_client, layout, 0, ["a"])
    second = await append(redis_client, layout, 0, ["b"])
    assert not await drained(redis_client, layout), "undelivered entries"
    stream = layout.stream(0)
    await redis_client.xreadgroup(layout.group, "w", {stream: ">"}, count=8)
    # Read but not acknowledged: no lag any more, but the entries are still in flight. (The
    # former helper asked XPENDING before the lag, and a read between the two answered 0, 0.)
    assert not await drained(redis_client, layout), "read, not acknowledged"
    await redis_client.xack(stream, layout.group, first, second)
    assert await drained(redis_client, layout)


async def test_a_lag_redis_cannot_compute_is_not_taken_for_zero(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    await append(redis_client, layout, 0, ["a"])
    doomed = await append(redis_client, layout, 0, ["b"])
    await append(redis_client, layout, 0, ["c"])
    await redis_client.xdel(layout.stream(0), doomed)  # lag is None now (Redis 7)
    [group] = await redis_client.xinfo_groups(layout.stream(0))
    assert group["lag"] is None
    assert not await drained(redis_client, layout)
