"""Scenario 3: the stack's PostgreSQL crashes (`pg_ctl stop -m immediate`, no checkpoint) under
load and comes back a few seconds later.

Proves: publishing is not affected (ingest only needs Redis), storage answers UNAVAILABLE instead
of failing for good, the processor keeps the entries pending and retries them (it waits; it
does not dead-letter them), no service has to be restarted, every commit acknowledged before the
crash survives WAL recovery, and afterwards everything drains in order.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from tests.faults.harness import FaultStack
from tests.faults.invariant import QueueWatcher, check_invariant, stored_rows
from tests.faults.load import Metadata

# Each wait inside is bounded and asserts with its own message; this ceiling only has to cover
# their sum (stack healing, load, drain, invariant) on a slow, shared 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DOWN_SECONDS = 3.0


async def test_postgres_down_for_a_while_under_load(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata
) -> None:
    cluster = stack.postgres
    if cluster is None:
        pytest.skip(
            "no PostgreSQL server binaries (initdb, pg_ctl, postgres) under "
            "/usr/lib/postgresql/*/bin: the stack runs on a shared server it must not stop"
        )
    pids = {name: stack.pid(name) for name in ("storage", "processor", "auth", "ingest")}
    dead_before = await redis_client.xlen(stack.layout.dead_letter_stream)
    failures_before = (await stack.processor_status()).store_failures
    watcher = QueueWatcher(redis_client, stack.layout)
    watcher.start()
    load = stack.load(producer)
    running = asyncio.create_task(load.run(duration=7.0))
    try:
        await asyncio.sleep(1.5)
        stored_before = len(await stored_rows(stack.config, load.report.event_type))
        await asyncio.to_thread(cluster.stop, "immediate")
        down_at = time.monotonic()
        acked_at_crash = len(load.report.acked)
        await asyncio.sleep(DOWN_SECONDS)
        await asyncio.to_thread(cluster.start)
        up_at = time.monotonic()
        acked_during = len(load.report.acked) - acked_at_crash
        report = await running
    finally:
        load.stop()
        await asyncio.gather(running, return_exceptions=True)
        await watcher.stop()
    result = await check_invariant(stack.config, report, redis_client)
    status = await stack.processor_status()
    outage_lag = max(
        (max(s.lag.values(), default=0) for s in watcher.between(down_at, up_at)), default=0
    )
    print(
        f"\n[postgres down {up_at - down_at:.1f}s] stored before the crash: {stored_before}; "
        f"acked while down: {acked_during}; max lag while down {outage_lag} entries; "
        f"processor store failures +{status.store_failures - failures_before}; "
        f"load {report.summary()}; invariant {result.summary()}"
    )
    assert stored_before > 0
    assert acked_during > 0, "publishing must not depend on the database"
    assert outage_lag > 0, "entries should have waited in Redis while the database was down"
    assert status.store_failures > failures_before, "the processor never saw the outage"
    assert await redis_client.xlen(stack.layout.dead_letter_stream) == dead_before, (
        "entries were dead-lettered because of a database outage"
    )
    assert {name: stack.pid(name) for name in pids} == pids, "a service died during the outage"
