"""What a `payload_json jsonb` column would cost storage's insert: 100k rows through storage's
own INSERT statement (services.storage.sql.INSERT_BATCH_JOINED, batches of 2,000, the processor's
usual size) into a fresh copy of the events table, in four layouts:

- none: the table as the migrations make it (what storage ships: payloads are parsed at query
  time, see services/storage/queries.py);
- column: plus `payload_json` generated from the payload by the safe parse function of migration
  0009 (a generated column: the INSERT statement stays as it is);
- column+gin: plus a GIN index (jsonb_path_ops) on it;
- column+gin+attrs: plus a GIN index on attributes.

Reported per layout: wall time and the Postgres backend's CPU (from /proc, so run it on the
database's host), both per event; the median of `--rounds` runs.

    .venv/bin/python scripts/bench_payload_json.py --dsn postgresql://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid

import asyncpg

from services.storage.sql import INSERT_BATCH_JOINED, TEXT_SEPARATOR, event_store_ddl
from services.storage.times import use_integer_timestamps

__all__ = ["main"]

_LAYOUTS = {
    "none": [],
    "column": [
        "ALTER TABLE events ADD COLUMN payload_json jsonb GENERATED ALWAYS AS"
        " (payload_jsonb(content_type, payload)) STORED"
    ],
    "column+gin": [
        "ALTER TABLE events ADD COLUMN payload_json jsonb GENERATED ALWAYS AS"
        " (payload_jsonb(content_type, payload)) STORED",
        "CREATE INDEX ON events USING gin (payload_json jsonb_path_ops)",
    ],
    "column+gin+attrs": [
        "ALTER TABLE events ADD COLUMN payload_json jsonb GENERATED ALWAYS AS"
        " (payload_jsonb(content_type, payload)) STORED",
        "CREATE INDEX ON events USING gin (payload_json jsonb_path_ops)",
        "CREATE INDEX ON events USING gin (attributes jsonb_path_ops)",
    ],
}
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def _batches(rows: int, size: int) -> list[list[object]]:
    base = 820_000_000_000_000  # 2026, as Postgres microseconds
    out = []
    for start in range(0, rows, size):
        count = min(size, rows - start)
        ids = [uuid.uuid4().hex for _ in range(count)]
        keys = [f"k{(start + i) % 500}" for i in range(count)]
        types = [("order.created", "order.paid", "user.signup")[i % 3] for i in range(count)]
        payloads = [
            json.dumps(
                {"amount": (start + i) % 997, "currency": "EUR", "qty": i % 7, "paid": i % 2 == 0,
                 "region": "eu-west"}
            ).encode()
            for i in range(count)
        ]  # fmt: skip
        times = [base + (start + i) * 1000 for i in range(count)]
        out.append([
            TEXT_SEPARATOR.join(ids), TEXT_SEPARATOR.join(keys), TEXT_SEPARATOR.join(types),
            times, [0] * count, payloads, TEXT_SEPARATOR.join(["application/json"] * count),
            TEXT_SEPARATOR.join(['{"region":"eu"}'] * count), times,
            TEXT_SEPARATOR.join(["bench"] * count), 0, TEXT_SEPARATOR.join(["default"] * count),
        ])  # fmt: skip
    return out


async def _run(dsn: str, layout: list[str], batches: list[list[object]]) -> tuple[float, float]:
    schema = f"bench_pj_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"SET search_path TO {schema}")
        for statement in [*event_store_ddl(), *layout]:
            await conn.execute(statement)
        await use_integer_timestamps(conn)
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        cpu, wall = _cpu_seconds(pid), time.perf_counter()
        for batch in batches:
            await conn.execute(INSERT_BATCH_JOINED, *batch)
        return time.perf_counter() - wall, _cpu_seconds(pid) - cpu
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


async def _main(
    dsn: str, rows: int, rounds: int, layouts: dict[str, list[str]] | None = None
) -> None:
    """Each layout (statements run after the migrations; the first is the baseline) `rounds`
    times, interleaved; one line per layout (scripts/bench_store_time.py passes its own)."""
    layouts = _LAYOUTS if layouts is None else layouts
    batches = _batches(rows, 2000)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in layouts}
    for _ in range(rounds):
        for name, layout in layouts.items():  # interleaved, so drift hits every layout alike
            results[name].append(await _run(dsn, layout, batches))
    base = next(iter(results.values()))
    base_wall = statistics.median(w for w, _ in base)
    base_cpu = statistics.median(c for _, c in base)
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(
            f"{name:18} wall {wall / rows * 1e6:6.2f} us/event ({wall / base_wall - 1:+6.1%})"
            f"  postgres cpu {cpu / rows * 1e6:6.2f} us/event ({cpu / base_cpu - 1:+6.1%})"
        )


def main() -> None:
    """Run the measurement and print one line per layout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1/test")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(_main(args.dsn, args.rows, args.rounds))


if __name__ == "__main__":
    main()
