"""What the idempotency window costs: ingest's CPU per event for StreamAppender.append with and
without it (the digests, the longer script's arguments), Redis's CPU per event (INFO cpu of a
Redis of the script's own, so nothing else counts), and Redis memory per remembered id
(MEMORY USAGE of the window's hashes over all their ids, at the default ids per partition).

    PYTHONPATH=. .venv/bin/python scripts/bench_idempotency.py --redis-url redis://127.0.0.1:6392/0 \
        [--batch 1000] [--batches 200] [--rounds 3]

Run it against a Redis of its own (it deletes the keys it made, under its own prefix, but
Redis's CPU counts every client). Best of --rounds; compare figures of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import redis.asyncio as aioredis

from services.ingest.idempotency import IdempotencyWindow
from services.ingest.queue import StreamAppender
from services.ingest.validation import BatchLimits, validate_batch
from streammesh.api.common.v1 import event_pb2
from streammesh.streams import StreamLayout

PAYLOAD = b'{"amount":12.5,"currency":"EUR","customer":"c-00042","items":3,"express":false}'


def _batches(count: int, size: int) -> list[list[event_pb2.Event]]:
    return [
        [
            event_pb2.Event(
                id=str(uuid.uuid4()), key=f"key-{i % 64}", type="order.created", payload=PAYLOAD
            )
            for i in range(size)
        ]
        for _ in range(count)
    ]


async def _redis_cpu(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _run(
    client: aioredis.Redis, window: IdempotencyWindow | None, batches: list[list[event_pb2.Event]]
) -> tuple[float, float]:
    """(ingest us/event, Redis us/event) of appending every batch once."""
    layout = StreamLayout(prefix=f"bench-idem:{uuid.uuid4().hex[:8]}", partitions=8)
    appender = StreamAppender(client, layout, window=window)
    limits = BatchLimits(max_batch_events=10_000)
    envelopes = [validate_batch(b, limits, producer="p") for b in batches]
    events = sum(map(len, batches))
    try:
        redis_before, cpu_before = await _redis_cpu(client), time.process_time()
        for batch, envelope in zip(batches, envelopes, strict=True):
            await appender.append(batch, envelope, producer="p", tenant="acme")
        cpu, redis_cpu = time.process_time() - cpu_before, await _redis_cpu(client) - redis_before
    finally:
        keys = [key async for key in client.scan_iter(f"{layout.prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    return cpu / events * 1e6, redis_cpu / events * 1e6


async def _bytes_per_id(client: aioredis.Redis, ids: int) -> float:
    """Bytes per id held by one partition's window after `ids` accepted ids (its two hashes,
    rotated by the cap; ids beyond it are forgotten and not counted)."""
    layout = StreamLayout(prefix=f"bench-idem:{uuid.uuid4().hex[:8]}", partitions=1)
    appender = StreamAppender(client, layout, window=IdempotencyWindow(600))
    try:
        for batch in _batches(ids // 1000, 1000):
            await appender.append(batch, producer="p", tenant="acme")
        keys = [k async for k in client.scan_iter(f"{layout.prefix}:idem:*")]
        used = held = 0
        for key in keys:
            used += int(await client.memory_usage(key, samples=0))
            held += int(await client.hlen(key)) - 1  # less its start field
        return used / held
    finally:
        keys = [key async for key in client.scan_iter(f"{layout.prefix}:*", count=1000)]
        await client.delete(*keys)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    client = aioredis.Redis.from_url(args.redis_url)
    try:
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for name, window in (("without", None), ("with", IdempotencyWindow(60))):
                figures = await _run(client, window, _batches(args.batches, args.batch))
                held = best.get(name)
                best[name] = (
                    figures
                    if held is None
                    else (min(held[0], figures[0]), min(held[1], figures[1]))
                )
        for name, (ingest, redis) in best.items():
            print(f"{name} the window: ingest {ingest:.2f} us/event, Redis {redis:.2f} us/event")
        for ids in (10_000, 100_000):
            per_id = await _bytes_per_id(client, ids)
            print(f"Redis memory after {ids:,} ids: {per_id:.1f} bytes per id held (UUID ids)")
    finally:
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
