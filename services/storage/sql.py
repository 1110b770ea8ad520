"""The event store's SQL contract, public: what storage itself runs, for anyone who must do the
same durable work outside storage (the bench's raw path) without importing storage's internals.

- `MIGRATIONS_PACKAGE` / `event_store_ddl()`: the DDL of the `events` table (partitioned by
  ingest_time, with `event_ids` holding each stored (tenant, id): migration 0012) and its
  indexes, as storage's migrations create them, in order;
- `INSERT_BATCH`: the one-statement idempotent batch insert storage runs for every batch, and
  `INSERT_BATCH_JOINED`, the same with its text columns bound as one text each
  (`TEXT_SEPARATOR`, `texts_joinable`), which storage runs whenever it can;
- `INSERT_PARTITIONS` / `INSERT_PARTITIONS_JOINED`: the same two with the partition bound per
  row, for a request holding the entries of several partitions;
- `RECORD_CONFLICTS` / `RECORD_CONFLICTS_JOINED`: what storage runs after an insert that
  skipped rows (and only then): the skipped rows whose content differs from the stored event,
  recorded in `event_conflicts`;
- `use_integer_timestamps`: the asyncpg codec INSERT_BATCH is bound with (timestamps as Postgres
  microsecond counts), and `PG_EPOCH_SECONDS` to compute those counts.
"""

from __future__ import annotations

from services.storage.times import PG_EPOCH_SECONDS, use_integer_timestamps
from streammesh.mesh.postgres import load_migrations

__all__ = [
    "FENCED_INSERTS",
    "INSERT_BATCH",
    "INSERT_BATCH_JOINED",
    "INSERT_PARTITIONS",
    "INSERT_PARTITIONS_JOINED",
    "MIGRATIONS_PACKAGE",
    "PG_EPOCH_SECONDS",
    "RECORD_CONFLICTS",
    "RECORD_CONFLICTS_JOINED",
    "STALE_LEASE_EPOCH_SQLSTATE",
    "TEXT_SEPARATOR",
    "event_store_ddl",
    "texts_joinable",
    "use_integer_timestamps",
]

MIGRATIONS_PACKAGE = "services.storage.migrations"
"""The package holding storage's versioned SQL (streammesh.mesh.postgres.migrate applies it)."""

_INSERT = """
WITH {fence_cte}b AS (
    SELECT *, row_number() OVER (PARTITION BY tenant, id ORDER BY ordinality) AS nth
    FROM unnest({p1}, {p2}, {p3}, $4::timestamptz[], $5::int2[], $6::bytea[],
                {p7}, {p8}, $9::timestamptz[], {p10}, {p12}{p11})
         WITH ORDINALITY AS b(id, key, type, event_time, event_time_nanos, payload, content_type,
                              attributes, ingest_time, producer, tenant{partition_column},
                              ordinality)
), stored AS (
    INSERT INTO events (tenant, id, key, type, event_time, event_time_nanos, payload,
                        content_type, attributes, partition, ingest_time, producer)
    SELECT b.tenant, b.id, b.key, b.type, b.event_time, b.event_time_nanos, b.payload,
           b.content_type, b.attributes::jsonb, {partition}, b.ingest_time, b.producer
    FROM b
    WHERE b.nth = 1
      AND NOT EXISTS (SELECT FROM event_ids AS i WHERE i.tenant = b.tenant AND i.id = b.id){fence_gate}
    ORDER BY b.ordinality
    RETURNING tenant, id, ingest_time, seq
)
INSERT INTO event_ids (tenant, id, ingest_time, seq)
SELECT tenant, id, ingest_time, seq FROM stored
"""
_TEXT_PARAMETERS = (1, 2, 3, 7, 8, 10, 12)
_ARRAY_TEXTS = {f"p{n}": f"${n}::text[]" for n in _TEXT_PARAMETERS}
_JOINED_TEXTS = {f"p{n}": f"string_to_array(${n}::text, E'\\x1f')" for n in _TEXT_PARAMETERS}
_UNFENCED = {"fence_cte": "", "fence_gate": ""}
# The lease fences ($13 streams, $14 partitions, $15 epochs: services/storage/event_fences.py)
# in the same statement as the insert, so a fenced store stays one round trip: the upsert raises
# each fence to the request's epoch when that is at least the stored one (and locks its row to
# the commit either way); the insert's pseudo-constant gate, which Postgres evaluates once
# before the first row, lets rows through only when every fence was raised, and otherwise
# calls event_fence_refused (migration 0016), which raises STALE_LEASE_EPOCH_SQLSTATE naming the
# stale partition: the statement, the fences' raise with it, is undone.
_FENCED = {
    "fence_cte": """fenced AS (
    INSERT INTO event_fences AS f (stream, partition, lease_epoch)
    SELECT * FROM unnest($13::text[], $14::int4[], $15::int8[])
    ON CONFLICT (stream, partition) DO UPDATE SET lease_epoch = EXCLUDED.lease_epoch
        WHERE f.lease_epoch <= EXCLUDED.lease_epoch
    RETURNING 1
), """,
    "fence_gate": """
      AND (SELECT CASE WHEN count(*) = cardinality($13::text[]) THEN true
                       ELSE event_fence_refused($13::text[], $14::int4[], $15::int8[]) END
           FROM fenced)""",
}
STALE_LEASE_EPOCH_SQLSTATE = "SMF01"
"""The SQLSTATE event_fence_refused raises: a fence below the partition's stored epoch."""

# $11 is one value for the whole batch, or (the PARTITIONS statements) one per row.
_ONE_PARTITION = {"partition": "$11", "p11": "", "partition_column": ""}
_ROW_PARTITIONS = {
    "partition": "b.partition",
    "p11": ", $11::int4[]",
    "partition_column": ", partition",
}

# One statement and one round trip per batch, with no BEGIN/COMMIT around it (a single statement
# is its own transaction): identity values are handed out in batch order (ORDER BY ordinality),
# so seq keeps per-key publish order, and re-deliveries are skipped. events is partitioned by
# ingest_time and has no unique index (migration 0012): event_ids holds every stored (tenant,
# id). A row is stored when event_ids does not hold its (tenant, id) and it is the first of the
# batch with it; its (tenant, id) goes into event_ids in the same statement. Two statements that
# store the same new (tenant, id) at once both pass the NOT EXISTS (neither sees the other's
# uncommitted row); the later one then fails on event_ids' key, as a whole, and storage runs it
# again (store.py), when the NOT EXISTS sees the committed row and skips it. Rows go through
# `events` itself, never a partition directly: the paging horizon reads the
# writers' locks on `events` (queries.py, PAGING_GUARANTEE). attributes travel as text
# and are cast per row: asyncpg has no jsonb[] encoder for Python values. Timestamps are bound
# as microsecond counts, so the connection needs `use_integer_timestamps`.
INSERT_BATCH = _INSERT.format(**_ARRAY_TEXTS, **_ONE_PARTITION, **_UNFENCED)
"""Parameters: $1 ids, $2 keys, $3 types, $4 event times (Postgres microseconds), $5 the
nanoseconds below them (0..999), $6 payloads, $7 content types, $8 attributes (JSON object text),
$9 ingest times (Postgres microseconds), $10 producers, $11 the partition, $12 tenants (one per
row: (tenant, id) is the idempotency key, event_ids' primary key); the status string's last
word is the number of rows that were new. Raises asyncpg's UniqueViolationError (on
event_ids_pkey) when a concurrent statement stored one of its new ids first: run it again."""

TEXT_SEPARATOR = "\x1f"
"""What INSERT_BATCH_JOINED's text parameters join their values with (ASCII unit separator)."""

# The same statement with the seven text columns each bound as ONE text, its values joined by
# TEXT_SEPARATOR and split by string_to_array. asyncpg checks every element of an array
# parameter against collections.abc ABCs (two Python-level isinstance calls per string); a text
# is one value. On 2,000-row batches that took storage's client side from 2.5 to 1.3 us per
# event, with no measurable change in the backend.
INSERT_BATCH_JOINED = _INSERT.format(**_JOINED_TEXTS, **_ONE_PARTITION, **_UNFENCED)
"""Parameters as INSERT_BATCH's, with $1, $2, $3, $7, $8, $10 and $12 joined texts; only for
batches `texts_joinable` accepts."""

# The two statements with the partition as one more column instead of one value for the batch:
# the entries of several partitions in one statement (one round trip, one commit), as a
# processor hands over a round's small groups at a low rate. Built from the same text, so they
# stay alike in everything else (order by ordinality, ON CONFLICT, the casts).
INSERT_PARTITIONS = _INSERT.format(**_ARRAY_TEXTS, **_ROW_PARTITIONS, **_UNFENCED)
"""Parameters as INSERT_BATCH's, but $11 is the partition of each row (int4[])."""

INSERT_PARTITIONS_JOINED = _INSERT.format(**_JOINED_TEXTS, **_ROW_PARTITIONS, **_UNFENCED)
"""Parameters as INSERT_BATCH_JOINED's, but $11 is the partition of each row (int4[])."""

# The four with the lease fences (see _FENCED): what storage runs for a request with fences.
FENCED_INSERTS = {
    (joined, by_row): _INSERT.format(
        **(_JOINED_TEXTS if joined else _ARRAY_TEXTS),
        **(_ROW_PARTITIONS if by_row else _ONE_PARTITION),
        **_FENCED,
    )
    for joined in (False, True)
    for by_row in (False, True)
}
"""(joined texts, partition per row) -> the fenced twin of INSERT_BATCH, INSERT_BATCH_JOINED,
INSERT_PARTITIONS or INSERT_PARTITIONS_JOINED: their parameters, then $13 the fences' streams,
$14 their partitions, $15 their lease epochs (sorted by stream and partition, each partition
once). Raises STALE_LEASE_EPOCH_SQLSTATE, having written nothing, when a stored epoch is
higher."""


_CONFLICTS = """
INSERT INTO event_conflicts (tenant, id, ingest_time, producer, key, type, payload_sha256,
                             payload_bytes)
SELECT b.tenant, b.id, b.ingest_time, b.producer, b.key, b.type, sha256(b.payload),
       length(b.payload)
FROM unnest({p1}, {p2}, {p3}, $4::timestamptz[], $5::int2[], $6::bytea[],
            {p7}, {p8}, $9::timestamptz[], {p10}, {p11})
     AS b(id, key, type, event_time, event_time_nanos, payload, content_type, attributes,
          ingest_time, producer, tenant)
JOIN event_ids i ON i.tenant = b.tenant AND i.id = b.id
JOIN events e ON e.tenant = i.tenant AND e.seq = i.seq AND e.ingest_time = i.ingest_time
WHERE (e.key, e.type, e.payload, e.content_type, e.attributes)
          IS DISTINCT FROM (b.key, b.type, b.payload, b.content_type, b.attributes::jsonb)
   OR ((e.event_time, e.event_time_nanos) IS DISTINCT FROM (b.event_time, b.event_time_nanos)
       AND NOT (e.event_time = e.ingest_time AND e.event_time_nanos = 0
                AND b.event_time = b.ingest_time AND b.event_time_nanos = 0))
ON CONFLICT DO NOTHING
"""
_CONFLICT_TEXTS = {**_ARRAY_TEXTS, "p11": "$11::text[]"}
_CONFLICT_JOINED = {**_JOINED_TEXTS, "p11": "string_to_array($11::text, E'\\x1f')"}

# Run only after an insert whose count says it skipped rows, so an insert of new events pays
# nothing. It joins the batch with the stored rows of the same (tenant, id): the rows this
# insert wrote match themselves, a re-delivery matches, and what remains is a second event
# under a stored id. An event time equal to the ingest time (to the microsecond) on both sides
# is the one ingest gives an event published without one, and is not compared: a retry of
# such an event gets a new one.
RECORD_CONFLICTS = _CONFLICTS.format(**_CONFLICT_TEXTS)
"""Parameters as INSERT_BATCH's without the partition: $1..$10 the same, $11 the tenants; the
status string's last word is the number of conflicts recorded."""

RECORD_CONFLICTS_JOINED = _CONFLICTS.format(**_CONFLICT_JOINED)
"""Parameters as RECORD_CONFLICTS's, the text ones joined as INSERT_BATCH_JOINED's."""


def texts_joinable(joined: list[str], count: int) -> bool:
    """Whether INSERT_BATCH_JOINED can take these text columns of a `count`-event batch, each
    its values joined by TEXT_SEPARATOR: at least 2 events (string_to_array makes an empty
    array of an empty text, so one empty value would vanish) and no value holding the
    separator itself (any other character may stand in a text column), that is, exactly
    count - 1 separators in each."""
    return count >= 2 and all(text.count(TEXT_SEPARATOR) == count - 1 for text in joined)


def event_store_ddl() -> list[str]:
    """The SQL of every storage migration, in order: run on a fresh schema (on the search_path),
    it creates the event store exactly as storage's own migrations do, indexes included."""
    return [migration.sql for migration in load_migrations(MIGRATIONS_PACKAGE)]
