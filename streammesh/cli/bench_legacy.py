"""The event store as it was before issue 9 (tenants, day partitions, `event_ids`), for the
bench's before/after insert cost: the raw path run against this table beside storage's own.

This is the shape storage's migrations 0001, 0003 and 0004 made (up to commit a9a9204^, before
migration 0007 gave events a tenant): one unpartitioned `events` table whose primary key is the
event id, its three seq-ordered indexes and the event-time index, none led by a tenant; and the
batch insert storage ran then, `ON CONFLICT (id) DO NOTHING`. It is written out here, not taken
from the migrations, because the migrations now go on to 0013: this is a fixed point to compare
against, and no service ever runs it.
"""

from __future__ import annotations

from streammesh.cli.bench_raw import RawTable

__all__ = ["LEGACY_EVENTS_DDL", "LEGACY_INSERT_BATCH", "LEGACY_INSERT_BATCH_JOINED", "legacy_table"]

LEGACY_EVENTS_DDL = [
    """
    CREATE TABLE events (
        seq              bigint GENERATED ALWAYS AS IDENTITY,
        id               text COLLATE "C" PRIMARY KEY,
        key              text COLLATE "C" NOT NULL,
        type             text COLLATE "C" NOT NULL,
        event_time       timestamptz NOT NULL,
        event_time_nanos smallint NOT NULL DEFAULT 0,
        payload          bytea NOT NULL,
        content_type     text NOT NULL,
        attributes       jsonb NOT NULL DEFAULT '{}',
        partition        integer NOT NULL,
        ingest_time      timestamptz NOT NULL,
        store_time       timestamptz NOT NULL DEFAULT now(),
        producer         text NOT NULL
    )
    """,
    "CREATE UNIQUE INDEX events_seq_idx ON events (seq)",
    "CREATE INDEX events_key_seq_idx ON events (key, seq)",
    "CREATE INDEX events_type_seq_idx ON events (type, seq)",
    "CREATE INDEX events_event_time_idx ON events (event_time)",
]
"""The pre-issue-9 `events` table: keyed by id, no tenant, not partitioned, no `event_ids`."""

_INSERT = """
INSERT INTO events (id, key, type, event_time, event_time_nanos, payload, content_type,
                    attributes, partition, ingest_time, producer)
SELECT b.id, b.key, b.type, b.event_time, b.event_time_nanos, b.payload, b.content_type,
       b.attributes::jsonb, $11, b.ingest_time, b.producer
FROM unnest({p1}, {p2}, {p3}, $4::timestamptz[], $5::int2[], $6::bytea[],
            {p7}, {p8}, $9::timestamptz[], {p10})
     WITH ORDINALITY AS b(id, key, type, event_time, event_time_nanos, payload, content_type,
                          attributes, ingest_time, producer, ordinality)
ORDER BY b.ordinality
ON CONFLICT (id) DO NOTHING
"""
_TEXTS = (1, 2, 3, 7, 8, 10)
LEGACY_INSERT_BATCH = _INSERT.format(**{f"p{n}": f"${n}::text[]" for n in _TEXTS})
"""The pre-issue-9 INSERT_BATCH: $1..$10 as storage's INSERT_BATCH, $11 the partition."""
LEGACY_INSERT_BATCH_JOINED = _INSERT.format(
    **{f"p{n}": f"string_to_array(${n}::text, E'\\x1f')" for n in _TEXTS}
)
"""The same with its text columns bound as joined texts (as INSERT_BATCH_JOINED's)."""


def legacy_table() -> RawTable:
    """The raw path's table and statements for the pre-issue-9 shape (no conflict recording:
    `event_conflicts` came with tenants, and the raw path's ids are all new anyway)."""
    return RawTable(
        ddl=LEGACY_EVENTS_DDL,
        inserts={True: LEGACY_INSERT_BATCH_JOINED, False: LEGACY_INSERT_BATCH},
        conflicts=None,
        tenants=False,
    )
