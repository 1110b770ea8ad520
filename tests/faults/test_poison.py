"""Scenario 4: a buggy producer XADDs entries no processor can store straight into partition
streams, between good traffic: one without the batch field, one whose batch is not a protobuf,
and one that decodes but that storage refuses (a NUL character in the key).

Proves: each lands in the dead-letter stream `<stream_prefix>:dead` with its error, the
partitions behind them keep flowing (events acknowledged after the poison, in the poisoned
partitions, are stored), and the invariant holds for the good events. Only the stream is
checked, so the test holds whether or not storage also records dead letters in a table.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import pytest
import redis.asyncio as aioredis

from streammesh.api.common.v1 import event_pb2
from streammesh.streams import BATCH_FIELD, COUNT_FIELD
from tests.faults.harness import FaultStack
from tests.faults.invariant import QueueWatcher, check_invariant
from tests.faults.load import Metadata

# Each wait inside is bounded and asserts with its own message; this ceiling only has to cover
# their sum (stack healing, load, drain, invariant) on a slow, shared 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _refused_batch(partition: int, event_type: str, run: str) -> bytes:
    """Decodes fine, but storage refuses it (INVALID_ARGUMENT: NUL in the key)."""
    batch = event_pb2.QueuedBatch(partition=partition)
    queued = batch.events.add(producer="buggy-producer")
    queued.event.CopyFrom(
        event_pb2.Event(id=f"{run}-poison", key="bad\x00key", type=event_type, payload=b"{}")
    )
    queued.ingest_time.GetCurrentTime()
    queued.event.event_time.GetCurrentTime()
    return batch.SerializeToString()


async def _dead_letters(client: aioredis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(stream))
    return [fields for _, fields in entries]


async def test_poison_entries_are_dead_lettered_and_traffic_flows(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata
) -> None:
    layout = stack.layout
    watcher = QueueWatcher(redis_client, layout)
    watcher.start()
    load = stack.load(producer)
    running = asyncio.create_task(load.run(duration=5.0))
    # Entry ids are unique per stream only: two partitions can hand out the same one.
    poison: dict[tuple[bytes, bytes], str] = {}
    try:
        await asyncio.wait_for(load.acked_batches.wait(), 10)
        await asyncio.sleep(0.5)
        run = load.report.event_type.removeprefix("fault.")
        entries = {
            0: ("no batch field", {b"junk": b"x"}),
            1: ("not a protobuf", {BATCH_FIELD: b"\xff\xff\xff\xff", COUNT_FIELD: b"1"}),
            2: (
                "refused by storage",
                {BATCH_FIELD: _refused_batch(2, load.report.event_type, run), COUNT_FIELD: b"1"},
            ),
        }
        for partition, (kind, fields) in entries.items():
            stream = layout.stream(partition)
            entry_id = cast(bytes, await redis_client.xadd(stream, fields))  # type: ignore[arg-type]
            poison[stream.encode(), entry_id] = kind
        poisoned_at = time.monotonic()
        report = await running
    finally:
        load.stop()
        await asyncio.gather(running, return_exceptions=True)
        await watcher.stop()

    deadline = time.monotonic() + 30
    found: dict[tuple[bytes, bytes], dict[bytes, bytes]] = {}
    while len(found) < len(poison) and time.monotonic() < deadline:
        for fields in await _dead_letters(redis_client, layout.dead_letter_stream):
            values = set(fields.values())
            for poisoned in poison:
                if set(poisoned) <= values:
                    found[poisoned] = fields
        await asyncio.sleep(0.2)
    assert set(found) == set(poison), (
        f"not dead-lettered: {[poison[i] for i in poison if i not in found]}"
    )
    result = await check_invariant(stack.config, report, redis_client)
    poisoned_keys = {key for key in report.order if layout.partition_for(key) in (0, 1, 2)}
    behind = [
        event_id
        for key in poisoned_keys
        for event_id in report.order[key]
        if report.ack_times.get(event_id, 0.0) > poisoned_at
    ]
    errors = {poison[i]: f.get(b"error", b"").decode()[:80] for i, f in found.items()}
    print(
        f"\n[poison] dead-lettered {len(found)}/{len(poison)}: {errors}; events acknowledged "
        f"behind the poison in its partitions: {len(behind)}; max lag {watcher.max_lag} "
        f"entries; load {report.summary()}; "
        f"invariant {result.summary()}"
    )
    assert behind, "no traffic was acknowledged behind the poison entries"
    for fields in found.values():
        assert fields.get(b"error"), f"dead letter without its error: {fields}"
