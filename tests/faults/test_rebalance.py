"""Scenario 5: a second processor joins under load, then the first one leaves: gracefully
(SIGTERM: it releases its leases) or not (SIGKILL: its leases expire after the TTL, its pending
entries wait for the survivor). And a processor frozen (SIGSTOP) past its lease TTL while a
peer runs, then resumed: the stale owner must not store out of order or acknowledge.

Proves: on join the partitions are split between the two (leases `<prefix>:lease:p<n>` name
both consumers), after the leave the survivor holds every partition, no entry is lost or
stored twice across the handovers, and per-key order holds across them.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from typing import cast

import pytest
import redis.asyncio as aioredis

from tests.faults.harness import FaultStack
from tests.faults.invariant import QueueWatcher, check_invariant
from tests.faults.load import Metadata

# Each wait inside is bounded and asserts with its own message; this ceiling only has to cover
# their sum (stack healing, load, drain, invariant) on a slow, shared 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def _lease_holders(client: aioredis.Redis, stack: FaultStack) -> list[str | None]:
    keys = [stack.layout.lease_key(p) for p in range(stack.layout.partitions)]
    values = cast(list[bytes | None], await client.mget(keys))
    return [None if v is None else v.decode() for v in values]


async def _wait_leases(
    client: aioredis.Redis, stack: FaultStack, wanted: set[str], timeout: float
) -> tuple[list[str | None], float]:
    """Until every partition is leased and the holders are exactly `wanted`."""
    started = time.monotonic()
    holders = await _lease_holders(client, stack)
    while not (None not in holders and set(holders) == wanted):
        assert time.monotonic() - started < timeout, f"leases {holders}, wanted {wanted}"
        await asyncio.sleep(0.05)
        holders = await _lease_holders(client, stack)
    return holders, time.monotonic() - started


@pytest.mark.parametrize("leave", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_processor_joins_then_first_leaves_under_load(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata, leave: signal.Signals
) -> None:
    first = (await stack.processor_status()).consumer
    second = f"faults-b-{uuid.uuid4().hex[:6]}"
    watcher = QueueWatcher(redis_client, stack.layout)
    watcher.start()
    load = stack.load(producer)
    running = asyncio.create_task(load.run(duration=7.0))
    try:
        await asyncio.wait_for(load.acked_batches.wait(), 10)
        await asyncio.sleep(1.0)
        joined = await stack.start(
            "processor", {"STREAMMESH_PROCESSOR_CONSUMER": second}, instance="b"
        )
        split, split_seconds = await _wait_leases(redis_client, stack, {first, second}, 15)
        await asyncio.sleep(1.0)
        stack.signal("processor", leave)
        assert await stack.wait_exit("processor", 15), f"the first processor outlived {leave.name}"
        alone, takeover_seconds = await _wait_leases(redis_client, stack, {second}, 15)
        report = await running
    finally:
        load.stop()
        await asyncio.gather(running, return_exceptions=True)
        await watcher.stop()
    result = await check_invariant(stack.config, report, redis_client)
    status = await stack.processor_status(joined.address)
    print(
        f"\n[rebalance, {leave.name}] after join: {split.count(first)} partitions on {first}, "
        f"{split.count(second)} on {second} (split {split_seconds:.2f}s after SERVING); "
        f"after the first left: all {alone.count(second)} on {second} "
        f"({takeover_seconds:.2f}s after it exited); second stored {status.events_stored} "
        f"events ({status.events_duplicate} duplicates); max lag {watcher.max_lag} entries; "
        f"load {report.summary()}; invariant {result.summary()}"
    )
    assert status.consumer == second and status.events_stored > 0


async def test_processor_frozen_past_its_lease_then_resumed(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata
) -> None:
    first = (await stack.processor_status()).consumer
    second = f"faults-b-{uuid.uuid4().hex[:6]}"
    peer = await stack.start("processor", {"STREAMMESH_PROCESSOR_CONSUMER": second}, instance="b")
    await _wait_leases(redis_client, stack, {first, second}, 15)
    load = stack.load(producer)
    running = asyncio.create_task(load.run(duration=7.0))
    try:
        await asyncio.sleep(1.5)
        stack.signal("processor", signal.SIGSTOP)  # a long GC pause, a VM stall
        alone, takeover_seconds = await _wait_leases(redis_client, stack, {second}, 15)
        await asyncio.sleep(1.0)
        stack.signal("processor", signal.SIGCONT)
        back, rejoin_seconds = await _wait_leases(redis_client, stack, {first, second}, 15)
        report = await running
    finally:
        stack.signal("processor", signal.SIGCONT)
        load.stop()
        await asyncio.gather(running, return_exceptions=True)
    result = await check_invariant(stack.config, report, redis_client)
    statuses = [await stack.processor_status(), await stack.processor_status(peer.address)]
    print(
        f"\n[frozen owner] all {alone.count(second)} partitions on {second} "
        f"{takeover_seconds:.2f}s after the freeze; after SIGCONT split again "
        f"({back.count(first)}/{back.count(second)}) within {rejoin_seconds:.2f}s; duplicates "
        f"skipped {[s.events_duplicate for s in statuses]}; load {report.summary()}; "
        f"invariant {result.summary()}"
    )
