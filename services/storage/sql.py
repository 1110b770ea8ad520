"""The event store's SQL contract, public: what storage itself runs, for anyone who must do the
same durable work outside storage (the bench's raw path) without importing storage's internals.

- `MIGRATIONS_PACKAGE` / `event_store_ddl()`: the DDL of the `events` table and its indexes, as
  storage's migrations create them, in order;
- `INSERT_BATCH`: the one-statement idempotent batch insert storage runs for every batch;
- `use_integer_timestamps`: the asyncpg codec INSERT_BATCH is bound with (timestamps as Postgres
  microsecond counts), and `PG_EPOCH_SECONDS` to compute those counts.
"""

from __future__ import annotations

from services.storage.times import PG_EPOCH_SECONDS, use_integer_timestamps
from streammesh.mesh.postgres import load_migrations

__all__ = [
    "INSERT_BATCH",
    "MIGRATIONS_PACKAGE",
    "PG_EPOCH_SECONDS",
    "event_store_ddl",
    "use_integer_timestamps",
]

MIGRATIONS_PACKAGE = "services.storage.migrations"
"""The package holding storage's versioned SQL (streammesh.mesh.postgres.migrate applies it)."""

# One statement and one round trip per batch, with no BEGIN/COMMIT around it (a single statement
# is its own transaction): identity values are handed out in batch order (ORDER BY ordinality),
# so seq keeps per-key publish order, and re-deliveries are skipped. attributes travel as text[]
# and are cast per row: asyncpg has no jsonb[] encoder for Python values. Timestamps are bound
# as microsecond counts, so the connection needs `use_integer_timestamps`.
INSERT_BATCH = """
INSERT INTO events (id, key, type, event_time, event_time_nanos, payload, content_type,
                    attributes, partition, ingest_time, producer)
SELECT b.id, b.key, b.type, b.event_time, b.event_time_nanos, b.payload, b.content_type,
       b.attributes::jsonb, $11, b.ingest_time, b.producer
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::int2[], $6::bytea[],
            $7::text[], $8::text[], $9::timestamptz[], $10::text[])
     WITH ORDINALITY AS b(id, key, type, event_time, event_time_nanos, payload, content_type,
                          attributes, ingest_time, producer, ordinality)
ORDER BY b.ordinality
ON CONFLICT (id) DO NOTHING
"""
"""Parameters: $1 ids, $2 keys, $3 types, $4 event times (Postgres microseconds), $5 the
nanoseconds below them (0..999), $6 payloads, $7 content types, $8 attributes (JSON object text),
$9 ingest times (Postgres microseconds), $10 producers, $11 the partition; the status string's
last word is the number of rows that were new."""


def event_store_ddl() -> list[str]:
    """The SQL of every storage migration, in order: run on a fresh schema (on the search_path),
    it creates the event store exactly as storage's own migrations do, indexes included."""
    return [migration.sql for migration in load_migrations(MIGRATIONS_PACKAGE)]
