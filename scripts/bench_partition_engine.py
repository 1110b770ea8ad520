"""Events per second through the per-partition engine (PartitionEngine: 3 windows and 5 rules
together), in process, on one core, as the worker will drive it.

The stream and the 5 rules are bench_patterns.py's (page views, readings, logins, carts,
purchases, payments; keys skewed; up to 50 ms of disorder). The 3 windows (sized so that they close
within the stream's 30 s of event time): a tumbling 1 s count per key over page views (45 % of
events), a hopping 5 s / 1 s window over readings (20 %) by payload.unit with count, mean and
p50/p95/p99 of payload.celsius, and a 2 s session per key over page views. Events go to 4 partitions by key (as ingest does); each batch of --batch events is
split by partition and each part goes to its partition's engine. With --snapshot-every N, each
partition is also snapshotted every N batches (the checkpoint the worker stores with the
outputs); its CPU is counted. With --split, the same stream also goes through engines with
the 3 windows and no rule, and with the 5 rules and no window (the parts' shares). The figure is
CPU time of the engine calls only (the stream is built first). Not a test: the machine is
shared, so compare figures of one run.

    .venv/bin/python scripts/bench_partition_engine.py [--events 300000] [--batch 500]
        [--snapshot-every 0] [--rounds 3] [--split]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time
from typing import Any

from bench_patterns import RULES, make_stream  # scripts/ is on the path when run as a script

from services.processor.engine.clock import ClockConfig
from services.processor.engine.events import EngineEvent
from services.processor.engine.partition import PartitionEngine
from services.processor.engine.patterns import parse_rules
from services.processor.engine.window_defs import parse_window_defs
from streammesh.streams import jump_hash

PARTITIONS = 4
WINDOWS: dict[str, Any] = {
    "windows": [
        {
            "id": "views-per-minute",
            "tenant": "default",
            "event_type": "page_view",
            "kind": "tumbling",
            "size": "1s",
            "allowed_lateness": "1s",
            "aggregates": [{"name": "n", "fn": "count"}],
        },
        {
            "id": "temperature",
            "tenant": "default",
            "event_type": "reading",
            "kind": "hopping",
            "size": "5s",
            "step": "1s",
            "group_by": "payload.unit",
            "aggregates": [
                {"name": "n", "fn": "count"},
                {"name": "avg", "fn": "mean", "field": "payload.celsius"},
                {"name": "p50", "fn": "p50", "field": "payload.celsius"},
                {"name": "p95", "fn": "p95", "field": "payload.celsius"},
                {"name": "p99", "fn": "p99", "field": "payload.celsius"},
            ],
        },
        {
            "id": "visits",
            "tenant": "default",
            "event_type": "page_view",
            "kind": "session",
            "gap": "2s",
            "aggregates": [{"name": "n", "fn": "count"}],
        },
    ]
}
CLOCK = ClockConfig(out_of_orderness_nanos=100_000_000, idle_timeout_nanos=5_000_000_000)


def partitioned(events: list[EngineEvent]) -> list[EngineEvent]:
    return [dataclasses.replace(e, partition=jump_hash(e.key.encode(), PARTITIONS)) for e in events]


def run_once(
    events: list[EngineEvent],
    batch: int,
    snapshot_every: int,
    *,
    with_windows: bool = True,
    with_rules: bool = True,
) -> tuple[float, Any]:
    windows = parse_window_defs(WINDOWS) if with_windows else []
    rules = parse_rules(RULES) if with_rules else []
    engines = [PartitionEngine(p, CLOCK, windows, rules) for p in range(PARTITIONS)]
    counts = {"results": 0, "alerts": 0, "late": 0, "snapshot_bytes": 0}
    started = time.process_time()
    for number, offset in enumerate(range(0, len(events), batch)):
        parts: list[list[EngineEvent]] = [[] for _ in range(PARTITIONS)]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--snapshot-every", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--split", action="store_true", help="also windows alone, rules alone")
    args = parser.parse_args()
    events = partitioned(make_stream(args.events, args.keys))
    gc.freeze()  # the input list is not what a worker holds (see bench_engine.py)
    if args.split:
        for label, parts in (("3 windows alone", (True, False)), ("5 rules alone", (False, True))):
            cpu = min(
                run_once(
                    events,
                    args.batch,
                    args.snapshot_every,
                    with_windows=parts[0],
                    with_rules=parts[1],
                )[0]
                for _ in range(args.rounds)
            )
            print(
                f"  {label}: {args.events / cpu:,.0f} events/s on one core "
                f"({cpu * 1e6 / args.events:.2f} CPU us/event, best of {args.rounds})"
            )
    best, counts = float("inf"), dict[str, int]()
    for _ in range(args.rounds):
        cpu, counts = run_once(events, args.batch, args.snapshot_every)
        best = min(best, cpu)
    snapshots = (
        f", a snapshot per partition every {args.snapshot_every} batches"
        f" (last {counts['snapshot_bytes'] / 1024:.0f} KiB)"
        if args.snapshot_every
        else ""
    )
    print(
        f"partition engine, 3 windows + {len(RULES)} rules, {args.events} events over "
        f"{PARTITIONS} partitions, batches of {args.batch}{snapshots}: "
        f"{args.events / best:,.0f} events/s on one core ({best * 1e6 / args.events:.2f} CPU "
        f"us/event, best of {args.rounds}); {counts['results']} results, "
        f"{counts['alerts']} alerts, {counts['late']} late"
    )


if __name__ == "__main__":
    main()
