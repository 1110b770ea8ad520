"""Events per second through the window engine alone, in process, on one core.

Three windows on one event type: a tumbling 1 m window by key (count, sum, mean, min, max), a
hopping 5 m / 1 m window by payload.region with p50/p95/p99 and a distinct count of customers,
and a session window by key (30 s gap). 1,000 keys (--keys) over 4 partitions (by key, as
ingest does), events 1 ms apart in event time with up to 200 ms of disorder (1 s allowed),
in batches of 500; 300,000 events span 5 minutes of event time. The figure is CPU time of the
engine's calls only. Not a test: the machine is shared, so compare figures of one run.

    .venv/bin/python scripts/bench_engine.py [--events 300000] [--keys 1000] [--batch 500] [--split]
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from typing import Any

from services.processor.engine.clock import ClockConfig
from services.processor.engine.events import EngineEvent
from services.processor.engine.window_defs import parse_window_defs
from services.processor.engine.windows import WindowEngine

DEFINITIONS: dict[str, Any] = {
    "windows": [
        {
            "id": "per-minute",
            "tenant": "acme",
            "event_type": "order",
            "kind": "tumbling",
            "size": "1m",
            "allowed_lateness": "10s",
            "aggregates": [
                {"name": "n", "fn": "count"},
                {"name": "total", "fn": "sum", "field": "payload.amount"},
                {"name": "avg", "fn": "mean", "field": "payload.amount"},
                {"name": "low", "fn": "min", "field": "payload.amount"},
                {"name": "high", "fn": "max", "field": "payload.amount"},
            ],
        },
        {
            "id": "five-minutes",
            "tenant": "acme",
            "event_type": "order",
            "kind": "hopping",
            "size": "5m",
            "step": "1m",
            "group_by": "payload.region",
            "aggregates": [
                {"name": "p50", "fn": "p50", "field": "payload.amount"},
                {"name": "p95", "fn": "p95", "field": "payload.amount"},
                {"name": "p99", "fn": "p99", "field": "payload.amount"},
                {"name": "customers", "fn": "distinct", "field": "payload.customer"},
            ],
        },
        {
            "id": "visits",
            "tenant": "acme",
            "event_type": "order",
            "kind": "session",
            "gap": "30s",
            "aggregates": [
                {"name": "n", "fn": "count"},
                {"name": "total", "fn": "sum", "field": "payload.amount"},
            ],
        },
    ]
}


def _events(count: int, key_count: int) -> list[EngineEvent]:
    rng = random.Random(1)  # noqa: S311 - benchmark data, not secrets
    keys = [f"k{n}" for n in range(key_count)]
    regions = ["eu", "us", "ap", "sa"]
    events = []
    for index in range(count):
        key_index = rng.randrange(len(keys))
        event_time = 1_700_000_000_000_000_000 + index * 1_000_000 - rng.randrange(0, 200_000_000)
        events.append(
            EngineEvent(
                id=f"e{index}",
                key=keys[key_index],
                type="order",
                event_time_nanos=event_time,
                partition=key_index % 4,  # ingest partitions by key
                tenant="acme",
                payload={
                    "amount": rng.lognormvariate(3, 1),
                    "region": regions[index % 4],
                    "customer": f"c{rng.randrange(50_000)}",
                },
            )
        )
    return events


def _run(
    definitions: dict[str, Any], events: list[EngineEvent], batch: int
) -> tuple[float, WindowEngine, int, int]:
    engine = WindowEngine(
        parse_window_defs(definitions),
        ClockConfig(out_of_orderness_nanos=1_000_000_000, idle_timeout_nanos=5_000_000_000),
    )
    results = late = 0
    started = time.process_time()
    for offset in range(0, len(events), batch):
        outputs = engine.process(events[offset : offset + batch], now_nanos=offset)
        results += len(outputs.results)
        late += len(outputs.late)
    return time.process_time() - started, engine, results, late


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--split", action="store_true", help="also time each window alone")
    args = parser.parse_args()
    events = _events(args.events, args.keys)
    # The input list (hundreds of thousands of events, held for the whole run) is not what a
    # worker holds; without this, the cyclic GC traverses it again and again and the figure
    # measures that. The engine's own state stays tracked.
    gc.freeze()
    if args.split:
        for definition in DEFINITIONS["windows"]:
            cpu, *_ = _run({"windows": [definition]}, events, args.batch)
            print(f"  {definition['id']:>13} alone: {cpu * 1e6 / args.events:.2f} CPU us/event")
    cpu, engine, results, late = _run(DEFINITIONS, events, args.batch)
    snapshot_bytes = sum(len(engine.snapshot(p)) for p in engine.partitions())
    print(
        f"{args.events} events, {args.keys} keys, 3 windows (tumbling, hopping with p50/p95/p99 "
        f"+ distinct, session): {args.events / cpu:,.0f} events/s on one core "
        f"({cpu * 1e6 / args.events:.2f} CPU us/event); {results} results, {late} late; "
        f"snapshot of 4 partitions {snapshot_bytes / 1024:.0f} KiB"
    )


if __name__ == "__main__":
    main()
