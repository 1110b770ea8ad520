"""Scenario 8: a closed loop (producers send the next batch as soon as one is acknowledged) into
a pipeline whose storage runs at a third of its speed (SIGSTOP 0.2 s, SIGCONT 0.1 s, over and
over), with ingest's limits of unacknowledged events and bytes set low.

Proves: the loop is held. Acknowledged minus stored never exceeds the events limit, so the
acknowledgement rate falls to the store rate; the backlog counters stay under both limits (one
ingest replica: exactly); Redis used_memory grows by no more than the bound stated in
services/ingest/pressure.py while the load acknowledges many times that; the counters are back
at zero once drained; and every acknowledged event is stored once, in per-key order.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import pytest
import redis.asyncio as aioredis

from streammesh.backlog import read_backlog
from tests.faults.harness import FaultStack
from tests.faults.invariant import QueueWatcher, check_invariant, stored_rows
from tests.faults.load import Metadata

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MAX_EVENTS = 2000
MAX_BYTES = 1024 * 1024
TRIM_AFTER_BYTES = 256 * 1024
PADDING = 1000
"""Payload bytes per event (a queued event is about 1.1 kB)."""
BATCH = 64
WINDOW = 8
DURATION = 10.0
READ_BYTES = 32 * (BATCH // 4) * 1200
"""One read of the processor (read_count 32) of entries of BATCH / 4 partitions events."""
OVERHEAD = 1.3
"""Redis's memory per batch byte, at most (services/ingest/pressure.py)."""
SLACK = 2 * 1024 * 1024
"""Client buffers, the pending lists, allocator noise."""


async def _throttle(stack: FaultStack, stop: asyncio.Event) -> None:
    """Storage at a third of its speed until `stop`."""
    while not stop.is_set():
        stack.signal("storage", signal.SIGSTOP)
        await asyncio.sleep(0.2)
        stack.signal("storage", signal.SIGCONT)
        await asyncio.sleep(0.1)


async def test_the_closed_loop_is_held_at_the_store_rate(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata
) -> None:
    await stack.restart(
        "ingest",
        {
            "STREAMMESH_INGEST_MAX_UNACKED_EVENTS": str(MAX_EVENTS),
            "STREAMMESH_INGEST_MAX_UNACKED_BYTES": str(MAX_BYTES),
            "STREAMMESH_INGEST_MAX_PARTITION_UNACKED_EVENTS": "0",
            "STREAMMESH_INGEST_MAX_PARTITION_UNACKED_BYTES": "0",
        },
    )
    await stack.restart(
        "processor", {"STREAMMESH_PROCESSOR_TRIM_AFTER_BYTES": str(TRIM_AFTER_BYTES)}
    )
    partitions = stack.layout.partitions
    memory_bound = int((MAX_BYTES + partitions * (TRIM_AFTER_BYTES + READ_BYTES)) * OVERHEAD)
    watcher = QueueWatcher(redis_client, stack.layout)
    baseline = (await watcher.sample()).used_memory
    watcher.start()
    load = stack.load(
        producer, producers=4, streaming=2, window=WINDOW, batch_size=BATCH, interval=0.0,
        padding=PADDING,
    )  # fmt: skip
    stop_throttle = asyncio.Event()
    throttle = asyncio.create_task(_throttle(stack, stop_throttle))
    running = asyncio.create_task(load.run(duration=DURATION))
    gaps: list[tuple[float, int, int]] = []  # (seconds into the load, acked, stored)
    started = time.monotonic()
    try:
        await asyncio.wait_for(load.acked_batches.wait(), 10)
        while not running.done():
            acked = len(load.report.acked)
            stored = len(await stored_rows(stack.config, load.report.event_type))
            gaps.append((time.monotonic() - started, acked, stored))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(running), 0.5)
        report = await running
    finally:
        stop_throttle.set()
        await asyncio.gather(throttle, return_exceptions=True)
        stack.signal("storage", signal.SIGCONT)
        load.stop()
        await asyncio.gather(running, return_exceptions=True)
        await watcher.stop()
    result = await check_invariant(stack.config, report, redis_client)
    after = await read_backlog(redis_client, stack.layout)
    loaded = [s for s in watcher.samples if s.at <= started + report.seconds]
    growth = max((s.used_memory for s in loaded), default=baseline) - baseline
    widest = max((acked - stored for _, acked, stored in gaps), default=0)
    during = [(t, a, s) for t, a, s in gaps if t <= DURATION]
    first, last = during[0], during[-1]
    seconds = max(last[0] - first[0], 1e-9)
    acked_rate, stored_rate = (last[1] - first[1]) / seconds, (last[2] - first[2]) / seconds
    print(
        f"\n[closed loop, limits {MAX_EVENTS} events / {MAX_BYTES:,} bytes] acknowledged "
        f"{acked_rate:,.0f}/s, stored {stored_rate:,.0f}/s over {seconds:.1f}s; widest "
        f"acknowledged - stored {widest}; max unacknowledged {watcher.max_unacked_events} "
        f"events, {watcher.max_unacked_bytes:,} bytes; used_memory {baseline:,} + max "
        f"{growth:,} bytes (bound {memory_bound:,}); acknowledged payload "
        f"{len(report.acked) * PADDING:,} bytes; refusals "
        f"{report.errors['RESOURCE_EXHAUSTED']}; load {report.summary()}; invariant "
        f"{result.summary()}"
    )
    assert report.errors["RESOURCE_EXHAUSTED"] > 0, "the limits never pushed back"
    assert report.exhausted_without_retry_info == 0
    assert len(gaps) >= 5, f"too few measurements: {gaps}"
    assert widest <= MAX_EVENTS, f"acknowledged ran {widest} events ahead of stored"
    assert 0 < watcher.max_unacked_events <= MAX_EVENTS
    assert 0 < watcher.max_unacked_bytes <= MAX_BYTES
    assert growth <= memory_bound + SLACK, f"Redis grew {growth:,} bytes"
    # The load went through the limits many times over: unbounded, the queue would have
    # held far more than the bound.
    assert len(report.acked) > 5 * MAX_EVENTS, "the load was too small"
    assert len(report.acked) * PADDING > memory_bound + SLACK, "the load was too small"
    assert sum(b.events for b in after) == sum(b.bytes for b in after) == 0
    assert not report.given_up
