"""Events per second through the per-partition engine (PartitionEngine: 3 windows and 5 rules
together), in process, on one core, as the worker will drive it.

The stream and the 5 rules are bench_patterns.py's (page views, readings, logins, carts,
purchases, payments; keys skewed; up to 50 ms of disorder). The 3 windows (sized so that they close
within the stream's 30 s of event time): a tumbling 1 s count per key over page views (45 % of
events), a hopping 5 s / 1 s window over readings (20 %) by payload.unit with count, mean and
p50/p95/p99 of payload.celsius, and a 2 s session per key over page views. Events go to 4 partitions by key (as ingest does); each batch of --batch events is
split by partition and each part goes to its partition's engine. With --snapshot-every N, each
partition is also snapshotted every N batches (the checkpoint the worker stores with the
outputs); its CPU is counted. The measuring is services/processor/engine_speed.py's (shared
with `streammesh bench`). Not a test: the machine is shared, so compare figures of one run.

    .venv/bin/python scripts/bench_partition_engine.py [--events 300000] [--batch 500]
        [--snapshot-every 0] [--rounds 3]
"""

from __future__ import annotations

import argparse
from typing import Any

from bench_patterns import RULES, make_stream  # scripts/ is on the path when run as a script

from services.processor.engine_speed import measure

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--snapshot-every", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--split", action="store_true", help="also the 3 windows alone and the 5 rules alone"
    )
    args = parser.parse_args()
    stream = make_stream(args.events, args.keys)
    if args.split:
        for label, windows, rules in (
            ("3 windows alone", WINDOWS, []),
            ("5 rules alone", {"windows": []}, RULES),
        ):
            part = measure(windows, rules, stream, partitions=PARTITIONS, batch=args.batch,
                           rounds=args.rounds)  # fmt: skip
            print(
                f"  {label}: {1e6 / part['cpu_us_per_event']:,.0f} events/s on one core "
                f"({part['cpu_us_per_event']:.2f} CPU us/event, best of {args.rounds})"
            )
    counts = measure(
        WINDOWS, RULES, stream, partitions=PARTITIONS,
        batch=args.batch, rounds=args.rounds, snapshot_every=args.snapshot_every,
    )  # fmt: skip
    best = counts["cpu_us_per_event"] * args.events / 1e6
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
