"""Events per second through the per-partition engine (PartitionEngine: windows and rules
together), in process, on one core, as the worker drives it: events go to their partition by key
(as ingest does), each batch is split by partition and each part goes to its partition's engine.
The figure is the process CPU time of the engine calls only (the stream is built first, and
frozen out of the cyclic GC: the input list is not what a worker holds). Not a test: the machine
is shared, so compare figures of one run.

Used by scripts/bench_partition_engine.py (a mixed stream) and by `streammesh bench`, which runs
this module in a process of its own (the CLI imports no service internals) on the bench's
processing workload (streammesh.cli.bench_workload: its 3 windows and 5 rules):

    .venv/bin/python -m services.processor.engine_speed [--events 300000] [--batch 500]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from collections.abc import Sequence
from typing import Any

from services.processor.engine.clock import ClockConfig
from services.processor.engine.events import EngineEvent
from services.processor.engine.partition import PartitionEngine
from services.processor.engine.patterns import parse_rules
from services.processor.engine.window_defs import parse_window_defs
from streammesh.cli import bench_workload as workload
from streammesh.streams import jump_hash

__all__ = ["measure", "partitioned", "run_once", "workload_events"]

CLOCK = ClockConfig(out_of_orderness_nanos=100_000_000, idle_timeout_nanos=5_000_000_000)


def partitioned(events: Sequence[EngineEvent], partitions: int) -> list[EngineEvent]:
    return [dataclasses.replace(e, partition=jump_hash(e.key.encode(), partitions)) for e in events]


def run_once(
    windows: dict[str, Any],
    rules: list[dict[str, Any]],
    events: Sequence[EngineEvent],
    *,
    partitions: int,
    batch: int,
    snapshot_every: int = 0,
    clock: ClockConfig = CLOCK,
) -> tuple[float, dict[str, int]]:
    """CPU seconds of one pass over `events` (already partitioned) and what it produced."""
    window_defs, rule_set = parse_window_defs(windows), parse_rules(rules)
    engines = [PartitionEngine(p, clock, window_defs, rule_set) for p in range(partitions)]
    counts = {"results": 0, "alerts": 0, "late": 0, "snapshot_bytes": 0}
    started = time.process_time()
    for number, offset in enumerate(range(0, len(events), batch)):
        parts: list[list[EngineEvent]] = [[] for _ in range(partitions)]
        for event in events[offset : offset + batch]:
            parts[event.partition].append(event)
        for engine, part in zip(engines, parts, strict=True):
            out = engine.process(part, offset, last_entry_id=f"{offset}-0")
            counts["results"] += len(out.window_results)
            counts["alerts"] += len(out.alerts)
            counts["late"] += len(out.window_late) + len(out.rule_late)
            if snapshot_every and number % snapshot_every == 0:
                counts["snapshot_bytes"] = len(engine.snapshot())
    return time.process_time() - started, counts


def measure(
    windows: dict[str, Any],
    rules: list[dict[str, Any]],
    events: Sequence[EngineEvent],
    *,
    partitions: int = 4,
    batch: int = 500,
    rounds: int = 3,
    snapshot_every: int = 0,
) -> dict[str, Any]:
    """Best of `rounds` passes: events/s on one core and CPU us/event, with the outputs."""
    events = partitioned(events, partitions)
    gc.freeze()
    best, counts = float("inf"), dict[str, int]()
    for _ in range(rounds):
        cpu, counts = run_once(
            windows, rules, events, partitions=partitions, batch=batch,
            snapshot_every=snapshot_every,
        )  # fmt: skip
        best = min(best, cpu)
    return {
        "events": len(events),
        "partitions": partitions,
        "batch": batch,
        "rounds": rounds,
        "windows": len(windows["windows"]),
        "rules": len(rules),
        "events_per_s": len(events) / best if best > 0 else None,
        "cpu_us_per_event": best * 1e6 / max(len(events), 1),
        **counts,
    }


def workload_events(
    count: int, *, keys: int, batch: int, rate: float, payload_bytes: int, tenant: str
) -> list[EngineEvent]:
    """The bench's processing events as the engine gets them: batches of `batch` events, one
    event time per batch, batches 1/rate*batch apart (the open loop's schedule)."""
    events: list[EngineEvent] = []
    templates = [
        workload.batch_payloads(batch, keys=keys, offset=t * batch, payload_bytes=payload_bytes)
        for t in range(4)
    ]
    step = round(batch / rate * 1e9)
    start = 1_800_000_000 * workload.SECOND
    for number in range(-(-count // batch)):
        t = start + number * step
        for index, (key, _, body) in enumerate(templates[number % len(templates)]):
            events.append(
                EngineEvent(
                    id=f"b-{number:010d}-{index:04d}", key=key, type="bench.proc",
                    event_time_nanos=t, tenant=tenant, payload=json.loads(body),
                )
            )  # fmt: skip
    return events[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--keys", type=int, default=1024)
    parser.add_argument("--source-batch", type=int, default=100, help="events per publish batch")
    parser.add_argument("--rate", type=float, default=5000.0, help="events/s of event time")
    parser.add_argument("--batch", type=int, default=500, help="events per engine call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    tenant = "default"
    docs = {"windows": [w | {"tenant": tenant} for w in workload.windows("bench.proc")]}
    rules = [r | {"tenant": tenant, "version": 1} for r in workload.rules("bench.proc")]
    events = workload_events(
        args.events, keys=args.keys, batch=args.source_batch, rate=args.rate,
        payload_bytes=128, tenant=tenant,
    )  # fmt: skip
    figures = measure(docs, rules, events, batch=args.batch, rounds=args.rounds)
    if args.json:
        print(json.dumps(figures))
    else:
        print(
            f"partition engine, the bench's 3 windows + 5 rules, {figures['events']} events: "
            f"{figures['events_per_s']:,.0f} events/s on one core "
            f"({figures['cpu_us_per_event']:.2f} CPU us/event, best of {args.rounds}); "
            f"{figures['results']} results, {figures['alerts']} alerts, {figures['late']} late"
        )


if __name__ == "__main__":
    main()
