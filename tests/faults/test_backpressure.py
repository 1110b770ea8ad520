"""Scenario 6: storage frozen (SIGSTOP) for a few seconds under load, with ingest's limit of
unacknowledged events per partition set low (STREAMMESH_INGEST_MAX_PARTITION_UNACKED_EVENTS),
then resumed (SIGCONT).

Proves: once a partition's unacknowledged events reach the limit the gateway answers
RESOURCE_EXHAUSTED with a google.rpc.RetryInfo delay, so the queue (unacknowledged events,
stream length, Redis used_memory) stays bounded instead of growing with the load; after SIGCONT
everything drains, the client's retries with the same ids are stored once, and per-key order
holds.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis.asyncio as aioredis

from tests.faults.harness import TUNING, FaultStack
from tests.faults.invariant import QueueWatcher, check_invariant
from tests.faults.load import Metadata

# Each wait inside is bounded and asserts with its own message; this ceiling only has to cover
# their sum (stack healing, load, drain, invariant) on a slow, shared 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MAX_EVENTS = 40
"""Unacknowledged events per partition: ~10 entries of the load (batches of 16 events over 4
partitions). Storage stopped without a limit, the load leaves ~200 per partition."""
STOPPED_SECONDS = 3.0
PADDING = 2000
"""Payload bytes per event, so that an unbounded queue shows in Redis memory: ~8 kB per entry
(4 events). Measured with storage stopped 3 s: used_memory grows ~3.9 MB without the limit,
~0.7 MB with it (at most MAX_EVENTS events per partition, plus untrimmed ones)."""
MEMORY_BOUND = 1536 * 1024


async def test_storage_frozen_gives_resource_exhausted_and_bounded_queue(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata
) -> None:
    await stack.restart(
        "ingest", {"STREAMMESH_INGEST_MAX_PARTITION_UNACKED_EVENTS": str(MAX_EVENTS)}
    )
    retry_after = float(TUNING["ingest"]["STREAMMESH_INGEST_RETRY_AFTER_SECONDS"])
    storage_pid = stack.pid("storage")
    watcher = QueueWatcher(redis_client, stack.layout)
    watcher.start()
    load = stack.load(producer, padding=PADDING)
    running = asyncio.create_task(load.run(duration=8.0))
    try:
        await asyncio.wait_for(load.acked_batches.wait(), 10)
        await asyncio.sleep(1.0)
        before = await watcher.sample()
        refused_before = load.report.errors["RESOURCE_EXHAUSTED"]
        stack.signal("storage", signal.SIGSTOP)
        stopped_at = time.monotonic()
        await asyncio.sleep(STOPPED_SECONDS)
        refused_while_stopped = load.report.errors["RESOURCE_EXHAUSTED"] - refused_before
        stack.signal("storage", signal.SIGCONT)
        resumed_at = time.monotonic()
        report = await running
    finally:
        stack.signal("storage", signal.SIGCONT)
        load.stop()
        await asyncio.gather(running, return_exceptions=True)
        await watcher.stop()
    result = await check_invariant(stack.config, report, redis_client)
    frozen = watcher.between(stopped_at, resumed_at)
    lag = max((max(s.lag.values(), default=0) for s in frozen), default=0)
    unacked = max((max((b.events for b in s.backlog), default=0) for s in frozen), default=0)
    length = max((max(s.length.values(), default=0) for s in frozen), default=0)
    memory = max((s.used_memory for s in frozen), default=0)
    print(
        f"\n[backpressure limit {MAX_EVENTS} events] storage stopped {resumed_at - stopped_at:.1f}s; "
        f"RESOURCE_EXHAUSTED while stopped: {refused_while_stopped} (RetryInfo delays "
        f"{sorted(set(report.retry_info_delays))}, without RetryInfo "
        f"{report.exhausted_without_retry_info}); while stopped: max unacknowledged events "
        f"{unacked} per partition, max lag {lag} entries "
        f"(before {max(before.lag.values(), default=0)}), max stream length {length} "
        f"(before {max(before.length.values(), default=0)}), used_memory "
        f"{before.used_memory} -> max {memory} bytes; load {report.summary()}; "
        f"invariant {result.summary()}; failures by API and message: "
        f"{ {m[:70]: n for m, n in report.error_messages.items()} }"
    )
    assert refused_while_stopped > 0, "the gateway never pushed back while storage was stopped"
    assert report.exhausted_without_retry_info == 0
    assert report.retry_info_delays and set(report.retry_info_delays) == {retry_after}
    assert frozen, "no queue sample while storage was stopped"
    # One ingest replica counts what it admits at once: the limit holds exactly.
    assert 0 < unacked <= MAX_EVENTS, f"{unacked} unacknowledged events, limit {MAX_EVENTS}"
    assert length <= max(before.length.values(), default=0) + MAX_EVENTS
    assert memory - before.used_memory < MEMORY_BOUND
    assert not report.given_up
    assert stack.pid("storage") == storage_pid
    # The refusal reaches the client exactly on both APIs, also on the Publish stream while the
    # client is still writing (streammesh.refusals; before it, grpc/grpc#36066 turned some into
    # UNAVAILABLE or INTERNAL).
    masked = {
        message: count
        for message, count in report.error_messages.items()
        if message.startswith(("Publish UNAVAILABLE: ingest failed", "Publish INTERNAL"))
    }
    assert not masked, f"refusals that lost their status: {masked}"
