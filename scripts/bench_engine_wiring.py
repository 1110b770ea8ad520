"""CPU per event of the processor's engine wiring alone, in process: the committer's `ack` over
queue entries as ingest writes them (QueuedColumns, 25 events each), with no definitions (the
fast path) and with 3 windows and 5 rules, split into decode, engine and the rest (outputs to
protobuf, snapshots, bookkeeping). Storage and Redis are stand-ins that only serialize what
they are sent, so the figure is the processor's own CPU for the wiring. Not a test.

    .venv/bin/python scripts/bench_engine_wiring.py [--entries 4000] [--per-entry 25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any, cast

from services.processor.engine.clock import ClockConfig
from services.processor.engine.partition import PartitionEngine
from services.processor.processing.committer import EngineCommitter, EngineConfig
from services.processor.processing.decode import engine_events
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import definitions_pb2 as pb
from streammesh.definitions.rules import Rule, parse_rule
from streammesh.definitions.window_defs import WindowDef, parse_window_def
from streammesh.entries import Entry
from streammesh.streams import COLUMNS_FIELD

COUNT = [{"name": "n", "fn": "count"}, {"name": "total", "fn": "sum", "field": "payload.v"}]
WINDOWS = [
    {"id": "tumble", "kind": "tumbling", "size": "1s", "aggregates": COUNT},
    {"id": "hop", "kind": "hopping", "size": "2s", "step": "1s", "aggregates": COUNT},
    {"id": "visits", "kind": "session", "gap": "500ms", "aggregates": COUNT},
]
MATCH = {"type": "reading"}
RULES = [
    {
        "id": "big",
        "kind": "threshold",
        "match": MATCH,
        "field": "payload.v",
        "op": "gt",
        "value": 990,
    },
    {"id": "burst", "kind": "rate", "match": MATCH, "count": 200, "within": "100ms"},
    {"id": "pair", "kind": "sequence", "steps": [MATCH, MATCH], "within": "1ms"},
    {"id": "three", "kind": "sequence", "steps": [MATCH, MATCH, MATCH], "within": "2ms"},
    {"id": "gap", "kind": "absence", "first": MATCH, "absent": MATCH, "within": "1s"},
]


class Definitions:
    def __init__(self, on: bool) -> None:
        self.version = 1
        self._windows = (
            [
                parse_window_def({"version": 1, "tenant": "default", "event_type": "reading", **w})
                for w in WINDOWS
            ]
            if on
            else []
        )
        self._rules = (
            [parse_rule({"version": 1, "tenant": "default", **r}) for r in RULES] if on else []
        )

    def windows_and_rules(self) -> tuple[list[WindowDef], list[Rule]]:
        return self._windows, self._rules

    def active_tenants(self) -> frozenset[str]:
        return frozenset({"default"}) if self._windows else frozenset()

    def is_ready(self) -> bool:
        return True


class Store:
    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0

    async def load(self, stream: str, partition: int, lease_epoch: int) -> None:
        return None

    async def store(self, request: pb.StoreEngineOutputsRequest) -> pb.StoreEngineOutputsResponse:
        self.calls += 1
        self.bytes += len(request.SerializeToString())
        return pb.StoreEngineOutputsResponse(checkpoint_saved=request.HasField("checkpoint"))


class Ownership:
    def epoch(self, partition: int) -> int:
        return 1

    def drop(self, partition: int, reason: str) -> None:
        raise AssertionError(reason)


class Source:
    ownership = Ownership()

    def holds(self, partition: int) -> bool:
        return True

    def active(self) -> frozenset[int]:
        return frozenset({0})

    async def ack(self, partition: int, entries: Sequence[Entry]) -> bool:
        return True

    async def ack_all(self, acks: Sequence[tuple[int, Sequence[Entry]]]) -> list[bool]:
        return [True] * len(acks)


def entries(count: int, per_entry: int) -> list[Entry]:
    made: list[Entry] = []
    t = 1_800_000_000_000_000  # microseconds
    for n in range(count):
        ids = [f"e{n}-{i}" for i in range(per_entry)]
        columns = event_pb2.QueuedColumns(
            ids=ids,
            keys=[f"k{(n * per_entry + i) % 500}" for i in range(per_entry)],
            types=["reading"] * per_entry,
            payloads=[
                json.dumps({"v": (n * 7 + i) % 1000, "pad": "x" * 40}).encode()
                for i in range(per_entry)
            ],
            content_types=[""] * per_entry,
            attributes=["{}"] * per_entry,
            event_time_micros=[t + (n * per_entry + i) * 200 for i in range(per_entry)],
            event_time_nanos=[0] * per_entry,
            ingest_time_micros=[t],
            producers=["p"],
            run_lengths=[per_entry],
            partition=0,
        )
        made.append((f"{1000 + n}-0".encode(), {COLUMNS_FIELD: columns.SerializeToString()}))
    return made


async def run(stream: list[Entry], on: bool, batch: int, every: int = 20) -> tuple[float, Store]:
    store = Store()
    committer = EngineCommitter(
        cast(Any, Source()),
        stream="bench",
        store=store,
        definitions=Definitions(on),
        config=EngineConfig(ClockConfig(200_000_000, 10**12), checkpoint_batches=every),
    )
    started = time.process_time()
    for start in range(0, len(stream), batch):
        await committer.ack(0, stream[start : start + batch])
    return time.process_time() - started, store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=4000)
    parser.add_argument("--per-entry", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4, help="entries per ack (one store call)")
    parser.add_argument("--checkpoint-batches", type=int, default=20)
    options = parser.parse_args()
    stream = entries(options.entries, options.per_entry)
    events = options.entries * options.per_entry
    off, _ = asyncio.run(run(stream, False, options.batch))
    on, store = asyncio.run(run(stream, True, options.batch, options.checkpoint_batches))
    started = time.process_time()
    decoded = [
        engine_events(stream[i : i + options.batch], 0)
        for i in range(0, len(stream), options.batch)
    ]
    decode = time.process_time() - started
    definitions = Definitions(True)
    engine = PartitionEngine(0, ClockConfig(200_000_000, 10**12), *definitions.windows_and_rules())
    started = time.process_time()
    for batch_events in decoded:
        engine.process(batch_events, 0)
    engine_cpu = time.process_time() - started
    us = 1e6 / events
    print(
        f"{events} events, {options.per_entry} per entry, {options.batch} entries per call, "
        f"a checkpoint every {options.checkpoint_batches} calls"
    )
    print(f"no definitions:        {off * us:6.2f} us/event")
    print(
        f"3 windows + 5 rules:   {on * us:6.2f} us/event "
        f"({store.calls} StoreEngineOutputs calls, {store.bytes / 1e6:.1f} MB)"
    )
    print(f"  of which decode      {decode * us:6.2f} us/event")
    print(
        f"  of which the engine  {engine_cpu * us:6.2f} us/event (decoded events, payload parsed)"
    )
    print(f"  the rest             {(on - decode - engine_cpu) * us:6.2f} us/event")


if __name__ == "__main__":
    main()
