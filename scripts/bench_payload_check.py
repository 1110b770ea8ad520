"""What ingest's per-batch payload check costs per event, in-process: `refused_events` over
batches of ~100-byte JSON events of one type with a 5-property schema, the validator cache warm
(every lookup a hit), compared with the same loop over events whose type has no schema. This is
ingest's CPU for the check alone, not the closed loop of `streammesh bench` (that figure, with a
schema registered in the bench's stack, is still to be measured).

    PYTHONPATH=. .venv/bin/python scripts/bench_payload_check.py [--batch 500] [--batches 200] [--rounds 5]

Best of --rounds of process CPU time; compare figures of one run only (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from scripts.bench_payload_validation import SCHEMA, VALID
from services.ingest.payload_check import refused_events
from services.ingest.registry_client import Change, StoredSchema
from services.ingest.schema_cache import SchemaCache
from streammesh.api.common.v1 import event_pb2


class _Registry:
    """Answers like storage's registry: one type with SCHEMA, no change ever."""

    async def schema(self, tenant: str, event_type: str, version: int) -> StoredSchema | None:
        if event_type != "order.created":
            return None
        return StoredSchema(version=1, schema=SCHEMA, latest_version=1)

    async def refuses_unknown_types(self, tenant: str) -> bool:
        return False

    async def changes(self, after: int, *, limit: int) -> tuple[list[Change], int, bool]:
        return [], 0, False


async def _per_event_us(
    cache: SchemaCache, events: list[event_pb2.Event], args: argparse.Namespace
) -> float:
    await refused_events(events, "t", cache)  # warm: compile once, cache the lookup
    best = float("inf")
    for _ in range(args.rounds):
        started = time.process_time()
        for _ in range(args.batches):
            refused = await refused_events(events, "t", cache)
            assert not refused
        best = min(best, (time.process_time() - started) / (args.batches * len(events)))
    return best * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cache = SchemaCache(_Registry())
    checked = [
        event_pb2.Event(id=f"e{i}", key=f"k{i % 50}", type="order.created", payload=VALID)
        for i in range(args.batch)
    ]
    unchecked = [
        event_pb2.Event(id=f"e{i}", key=f"k{i % 50}", type="no.schema", payload=VALID)
        for i in range(args.batch)
    ]
    with_schema = await _per_event_us(cache, checked, args)
    without = await _per_event_us(cache, unchecked, args)
    print(f"payload: {len(VALID)} bytes, schema: 5 properties, batch: {args.batch} events")
    print(f"check with a schema:     {with_schema:.2f} us/event (CPU)")
    print(f"type without a schema:   {without:.2f} us/event (CPU)")
    print(f"validation cost:         {with_schema - without:.2f} us/event")


if __name__ == "__main__":
    asyncio.run(main())
