"""The fenced acks of one round across partitions: one script call per partition side by side
(as before), or the same scripts pipelined in one round trip (`PartitionOwnership.ack_many`).

    .venv/bin/python scripts/bench_fenced_ack.py [--redis redis://127.0.0.1:6379/0] [--partitions 8] [--rounds 1500]

Each round acknowledges one fresh entry in each partition, as a round at a low rate does after
its one StoreEvents call across partitions. Printed per mode, alternating twice (the machine
is shared): wall and client CPU per round. The keys live under a prefix of their own, deleted
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any, cast

import redis.asyncio as aioredis

from services.processor.source.ownership import PartitionOwnership
from streammesh.entries import Entry
from streammesh.streams import COLUMNS_FIELD, COUNT_FIELD, StreamLayout


async def _rounds(
    client: aioredis.Redis, layout: StreamLayout, rounds: int
) -> list[list[tuple[int, list[Entry]]]]:
    """`rounds` fresh entries per partition, read by the consumer, one of each per round."""
    async with client.pipeline(transaction=False) as pipe:
        for _ in range(rounds):
            for stream in layout.streams():
                pipe.xadd(stream, {COLUMNS_FIELD: b"x" * 200, COUNT_FIELD: b"1"})
        await pipe.execute()
    reply = await client.xreadgroup(
        layout.group,
        "bench",
        {stream: ">" for stream in layout.streams()},
        count=rounds,
    )
    read = {
        layout.partition_of_stream(stream): entries
        for stream, entries in cast(list[tuple[bytes, list[Entry]]], reply)
    }
    return [[(p, [read[p][r]]) for p in range(layout.partitions)] for r in range(rounds)]


async def _run(url: str, partitions: int, rounds: int) -> None:
    client = aioredis.Redis.from_url(url)
    prefix = f"bench-ack-{uuid.uuid4().hex[:8]}"
    layout = StreamLayout(prefix=f"{prefix}:events", partitions=partitions)
    await layout.ensure_group(client)
    owner = PartitionOwnership(
        client,
        layout,
        "bench",
        lease_ttl_ms=3_600_000,
        heartbeat_ms=1_000,
        forget=lambda p: layout.partition_key("attempts", p),
    )
    await owner.acquire(range(partitions))
    try:
        for mode in ("one call per partition", "one pipeline") * 2:
            work = await _rounds(client, layout, rounds)
            cpu, wall = time.process_time(), time.perf_counter()
            for acks in work:
                results: list[Any]
                if mode == "one pipeline":
                    results = await owner.ack_many(acks)
                else:
                    results = await asyncio.gather(*(owner.ack(p, *e) for p, e in acks))
                assert all(results), "a lease was lost during the bench"
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(
                f"{mode:>22}: {wall / rounds * 1e6:6.0f} us/round wall, "
                f"{cpu / rounds * 1e6:5.0f} us/round client CPU "
                f"({partitions} partitions, {rounds} rounds)"
            )
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1500)
    args = parser.parse_args()
    asyncio.run(_run(args.redis, args.partitions, args.rounds))


if __name__ == "__main__":
    main()
