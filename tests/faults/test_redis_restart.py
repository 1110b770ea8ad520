"""Scenario 2: the stack's Redis killed (SIGKILL) and later stopped (SIGTERM) under load, each
time started again on the same port from the same directory (AOF, appendfsync always; see
backends.py for why `always`).

So that the restart has something to lose, storage is frozen (SIGSTOP) for a second before
each outage: the events acknowledged in that second exist only in Redis when it goes down.

Proves: every one of those acknowledged-but-unstored events survives the kill (replayed from
the AOF) and is stored exactly once; the backlog counters come back in step with the streams
(zero once drained); ingest fails the publishes Redis cannot take (the client
retries them with the same ids); the processor and ingest reconnect on their own; per-key
order holds.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis.asyncio as aioredis

from streammesh.backlog import read_backlog
from tests.faults.harness import FaultStack
from tests.faults.invariant import QueueWatcher, check_invariant, stored_rows
from tests.faults.load import Metadata

# Each wait inside is bounded and asserts with its own message; this ceiling only has to cover
# their sum (stack healing, load, drain, invariant) on a slow, shared 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def test_redis_restarted_under_load(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata
) -> None:
    server = stack.redis
    if server is None:
        pytest.skip(
            "redis-server is not on PATH: the stack runs on a shared Redis it must not kill"
        )
    pids = {name: stack.pid(name) for name in ("ingest", "processor", "auth", "storage")}
    watcher = QueueWatcher(redis_client, stack.layout)
    watcher.start()
    load = stack.load(producer)
    running = asyncio.create_task(load.run(duration=8.5))
    outages = []
    only_in_redis: set[str] = set()
    try:
        await asyncio.wait_for(load.acked_batches.wait(), 10)
        # The SIGKILL outage outlasts the processor's lease TTL (1.5 s): leases and membership
        # expire while Redis is away and are taken again after it is back.
        for sig, down in ((signal.SIGKILL, 2.0), (signal.SIGTERM, 0.5)):
            await asyncio.sleep(1.0)
            stack.signal("storage", signal.SIGSTOP)
            await asyncio.sleep(1.0)
            stored = {row[0] for row in await stored_rows(stack.config, load.report.event_type)}
            at_risk = load.report.acked - stored
            only_in_redis |= at_risk
            started = time.monotonic()
            # Stops our own redis-server by its PID (and waits for it to exit).
            await asyncio.to_thread(server.stop, sig)
            await asyncio.sleep(down)
            await asyncio.to_thread(server.start)
            stack.signal("storage", signal.SIGCONT)
            outages.append((sig.name, len(at_risk), round(time.monotonic() - started, 2)))
        report = await running
    finally:
        stack.signal("storage", signal.SIGCONT)
        load.stop()
        await asyncio.gather(running, return_exceptions=True)
        await watcher.stop()
    result = await check_invariant(stack.config, report, redis_client)
    # Drained, so the backlog counters must read zero: they came back from the AOF in step
    # with the streams, through both outages.
    backlog = await read_backlog(redis_client, stack.layout)
    print(
        f"\n[redis restart] backlog counters after the drain {backlog}; outages (signal, acknowledged events only in Redis when it went "
        f"down, seconds down): {outages}; max lag {watcher.max_lag} entries; "
        f"load {report.summary()}; invariant {result.summary()}; failures by API and "
        f"message: { {m[:90]: n for m, n in report.error_messages.items()} }"
    )
    assert all(at_risk > 0 for _, at_risk, _ in outages), "nothing was at risk in an outage"
    assert only_in_redis <= report.acked  # and check_invariant found every acked one stored
    assert all(b.events == b.bytes == 0 for b in backlog), backlog
    # The publishes that hit the outage failed and were retried with their ids.
    assert sum(report.errors.values()) > 0, "no publish failed: Redis was not down under load"
    assert not report.given_up
    # No service died or had to be restarted: they rode the outages out.
    assert {name: stack.pid(name) for name in pids} == pids


async def test_redis_back_without_its_data_still_stores_new_events(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata
) -> None:
    """README: without AOF a Redis restart loses what was not stored yet. What it must not do
    is stop the pipeline: events acknowledged after the restart must still be stored."""
    server = stack.redis
    if server is None:
        pytest.skip("redis-server is not on PATH: the stack runs on a shared Redis")
    try:
        await asyncio.to_thread(server.stop, signal.SIGKILL)
        server.wipe()  # what a Redis without persistence comes back with
        await asyncio.to_thread(server.start)
        await asyncio.sleep(1.0)  # the processors' heartbeats and reads meet the empty Redis
        load = stack.load(producer)
        report = await load.run(duration=2.0)
        await check_invariant(stack.config, report, redis_client, timeout=6)
    finally:
        # A processor stuck on NOGROUP still reports SERVING, so heal() would keep it.
        await stack.restart("processor")
