"""What a per-row store_time costs storage's insert: 100k rows through storage's own INSERT
statement (services.storage.sql.INSERT_BATCH_JOINED, batches of 2,000) into a fresh copy of the
events table, with store_time defaulting to now() (the start of the storing transaction, before
migration 0011) and to clock_timestamp() (the moment each row is written, what QueryEvents'
paging horizon needs: services/storage/queries.py). Wall time and the Postgres backend's CPU
per event (from /proc, so run it on the database's host), the median of `--rounds` runs,
interleaved; the harness is scripts/bench_payload_json.py's.

    .venv/bin/python -m scripts.bench_store_time --dsn postgresql://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import asyncio

from scripts.bench_payload_json import _main

__all__ = ["main"]

_DEFAULTS = {
    f"default {expression}": [
        f"ALTER TABLE events ALTER COLUMN store_time SET DEFAULT {expression}"
    ]
    for expression in ("now()", "clock_timestamp()")
}


def main() -> None:
    """Run the measurement and print one line per default."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1/test")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(_main(args.dsn, args.rows, args.rounds, _DEFAULTS))


if __name__ == "__main__":
    main()
