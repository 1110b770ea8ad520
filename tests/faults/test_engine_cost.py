"""A measurement, not a speed test: the processor's CPU per event with no definitions at all
(the engine's fast path: nothing decoded), then with 3 windows and 5 rules on the same load,
with real processes (the fault stack). Run alone: earlier tests of a session leave definitions.

    .venv/bin/python -m pytest -q -s tests/faults/test_engine_cost.py

It asserts what must hold whatever the speed: every acknowledged event stored once, the queue
drained (every entry covered by a checkpoint), and alerts and window results with the rules on.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from streammesh.api.storage.v1 import definitions_pb2 as pb
from streammesh.api.storage.v1 import definitions_pb2_grpc as pb_grpc
from streammesh.mesh import TlsMaterial, create_channel, service_config
from tests.faults.harness import FaultStack
from tests.faults.invariant import check_invariant
from tests.faults.load import Metadata
from tests.faults.test_engine_faults import ENGINE_ENV, define, definitions, stored_outputs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SECONDS = 10.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def any_definitions(stack: FaultStack) -> bool:
    channel = create_channel(
        stack.config.address("storage"),
        TlsMaterial.load(stack.config.pki_dir, "processor"),
        server_name="storage",
        config=service_config("streammesh.storage.v1.DefinitionService", health_checked=False),
    )
    async with channel:
        reply = await pb_grpc.DefinitionServiceStub(channel).ListDefinitionChanges(
            pb.ListDefinitionChangesRequest(limit=1), timeout=10
        )
    return bool(reply.changes)


async def phase(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata, *, rules: bool
) -> tuple[float, int, str]:
    """Processor CPU µs per stored event over one load of SECONDS, and the load's type."""
    load = stack.load(producer, producers=2, batch_size=100, interval=0.05)
    if rules:
        await define(stack, load.report.event_type, quiet=True)
        await asyncio.sleep(1.5)  # followed by the processor
    pid = stack.pid("processor")
    assert pid is not None
    before = cpu_seconds(pid)
    started = time.monotonic()
    report = await load.run(duration=SECONDS)
    result = await check_invariant(stack.config, report, redis_client)
    used = cpu_seconds(pid) - before
    print(
        f"\n[engine cost, {'3 windows + 5 rules' if rules else 'no definitions'}] "
        f"{result.stored} events in {time.monotonic() - started:.1f}s "
        f"({result.stored / SECONDS:.0f}/s offered over {SECONDS:.0f}s); processor CPU "
        f"{used:.2f}s = {used / result.stored * 1e6:.1f} us/event"
    )
    return used / result.stored * 1e6, result.stored, load.report.event_type


async def test_processor_cpu_per_event_without_and_with_definitions(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata
) -> None:
    if await any_definitions(stack):
        pytest.skip("definitions exist in this session's storage: run this test alone")
    await stack.restart("processor", ENGINE_ENV)
    off, _, _ = await phase(stack, redis_client, producer, rules=False)
    on, _, event_type = await phase(stack, redis_client, producer, rules=True)
    windows, rules = definitions(event_type, quiet=True)
    got = await stored_outputs(stack, {w["id"] for w in windows}, {r["id"] for r in rules})
    print(f"[engine cost] with definitions / without: {on / off:.2f}x")
    print(f"[engine cost] stored: {len(got['alerts'])} alerts, {len(got['results'])} results")
    assert got["results"]
