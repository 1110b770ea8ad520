"""Scenario 1: a processor SIGKILLed mid-batch, before the store commit and after it (before the
XACK), then restarted without the failpoint.

Proves: the entries the dead processor had read stay pending, its leases expire, the restarted
processor (a new consumer) claims them and stores them in order before anything newer; a batch
stored but not acknowledged is stored again as a no-op (duplicates counted by the processor,
none in Postgres). Invariant at the end.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from tests.faults.harness import FaultStack
from tests.faults.invariant import QueueWatcher, check_invariant
from tests.faults.load import Metadata

# Each wait inside is bounded and asserts with its own message; this ceiling only has to cover
# their sum (stack healing, load, drain, invariant) on a slow, shared 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize("step", ["before-store", "after-store"])
async def test_processor_killed_mid_batch_then_restarted(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata, step: str
) -> None:
    crash_at = 25
    old = await stack.restart(
        "processor", {"STREAMMESH_PROCESSOR_FAILPOINT": f"crash-{step}:{crash_at}"}
    )
    watcher = QueueWatcher(redis_client, stack.layout)
    watcher.start()
    load = stack.load(producer)
    running = asyncio.create_task(load.run(duration=5.0))
    try:
        # The failpoint fires on the processor's 25th store of this run.
        assert await stack.wait_exit("processor", timeout=15), (
            f"the processor did not crash at its failpoint (crash-{step}:{crash_at})"
        )
        died = time.monotonic()
        await asyncio.sleep(1.0)  # entries pile up, pending under the dead consumer
        pending_while_dead = sum(watcher.samples[-1].lag.values()) if watcher.samples else 0
        new = await stack.start("processor")
        report = await running
    finally:
        load.stop()
        await asyncio.gather(running, return_exceptions=True)
        await watcher.stop()
    result = await check_invariant(stack.config, report, redis_client)
    status = await stack.processor_status()
    print(
        f"\n[crash {step}:{crash_at}] pid {old.pid} died, restarted as pid {new.pid} "
        f"({time.monotonic() - died:.1f}s ago); entries waiting while dead: "
        f"{pending_while_dead}; max lag {watcher.max_lag} entries; load {report.summary()}; "
        f"invariant {result.summary()}; new processor: stored {status.events_stored}, "
        f"duplicates {status.events_duplicate}"
    )
    assert status.consumer and status.batches_stored > 0
    if step == "after-store":
        # The batch committed just before the kill came back and was recognised as stored.
        assert status.events_duplicate > 0
