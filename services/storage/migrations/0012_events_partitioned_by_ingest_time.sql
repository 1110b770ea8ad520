-- events becomes a table partitioned by range of ingest_time (services/storage/partitions.py
-- creates daily partitions ahead and drops the ones past the retention), so that retention is a
-- DROP of whole partitions, never a long DELETE (which would hold QueryEvents pages back:
-- services/storage/queries.py, PAGING_GUARANTEE).
--
-- Why ingest_time: ingest assigns it once and it travels in the queue entry, so every
-- redelivery of an entry carries the same value and lands in the same partition; event_time is
-- the producer's and may lie anywhere (backfills would scatter a day's writes over years).
--
-- Idempotency across partitions: Postgres wants the partition key in every unique index, so
-- (tenant, id) is kept unique in event_ids, a table that is not partitioned, written by the same
-- statement as events (services/storage/sql.py: rows whose (tenant, id) event_ids holds are
-- skipped, the others stored in events and their (tenant, id, ingest_time, seq) in event_ids).
-- event_ids' primary key is then the only unique index the insert needs, so events has none:
-- the (tenant, id) index events had is gone, and each event costs one more (narrow) row, not
-- one more index entry. scripts/bench_partitions.py (storage's insert, 100k rows in batches of
-- 2,000) measured the Postgres CPU per event at 13.2 and 11.9 us before (medians of 5 and 7
-- runs), 14.6 and 13.1 after with one partition, 15.3 and 13.9 with 40 daily partitions
-- attached; writing event_ids first (ON CONFLICT DO NOTHING RETURNING) and keeping a (tenant,
-- id, ingest_time) key on events cost 19.0 and 18.1. event_ids keeps an id for as long as its
-- event is kept: the retention deletes the event_ids rows of a partition after detaching it,
-- before dropping it. A filter on `id` in a query now reads the tenant's index range it selects
-- by seq, key, type or time, and filters it; no index of events is led by id.
--
-- Upgrade: this rewrites the table under an ACCESS EXCLUSIVE lock (writes and reads of events
-- wait for it; acceptable at this stage of the project). Rows keep their seq and store_time; the
-- new identity continues where the old one stopped; every existing row goes to one partition
-- covering everything before tomorrow (UTC), so nothing needs to be sorted into days; new
-- partitions begin at tomorrow.
LOCK TABLE events IN ACCESS EXCLUSIVE MODE;

ALTER TABLE events RENAME TO events_unpartitioned;
ALTER TABLE events_unpartitioned DROP CONSTRAINT events_pkey;
ALTER INDEX events_tenant_seq_idx RENAME TO events_unpartitioned_tenant_seq_idx;
ALTER INDEX events_tenant_key_seq_idx RENAME TO events_unpartitioned_tenant_key_seq_idx;
ALTER INDEX events_tenant_type_seq_idx RENAME TO events_unpartitioned_tenant_type_seq_idx;
ALTER INDEX events_tenant_event_time_idx RENAME TO events_unpartitioned_tenant_event_time_idx;

-- LIKE keeps every column as it is (collations, NOT NULL, defaults: store_time's
-- clock_timestamp() of 0011), and INCLUDING IDENTITY gives seq a new identity with the same
-- options (CACHE 1: the paging guarantee needs it; the migration test checks it).
CREATE TABLE events (LIKE events_unpartitioned INCLUDING DEFAULTS INCLUDING IDENTITY)
    PARTITION BY RANGE (ingest_time);
CREATE INDEX events_tenant_seq_idx ON events (tenant, seq);
CREATE INDEX events_tenant_key_seq_idx ON events (tenant, key, seq);
CREATE INDEX events_tenant_type_seq_idx ON events (tenant, type, seq);
CREATE INDEX events_tenant_event_time_idx ON events (tenant, event_time, event_time_nanos);

-- Any ingest_time without a daily partition (one far in the future or the past, or one whose day
-- was not created in time) lands here, so an insert never fails for a missing partition.
-- partitions.py deletes its rows past the retention in bounded batches.
CREATE TABLE events_default PARTITION OF events DEFAULT;

-- ingest_time and seq find the stored event of an id: (tenant, seq) is an index of every
-- partition, and ingest_time prunes the partitions to the one that holds it.
CREATE TABLE event_ids (
    tenant      text COLLATE "C" NOT NULL,
    id          text COLLATE "C" NOT NULL,
    ingest_time timestamptz NOT NULL,
    seq         bigint NOT NULL,
    CONSTRAINT event_ids_pkey PRIMARY KEY (tenant, id)
);

DO $$
DECLARE
    tomorrow timestamptz := date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                            + interval '1 day';
BEGIN
    EXECUTE format(
        'CREATE TABLE %I PARTITION OF events FOR VALUES FROM (MINVALUE) TO (%L)',
        'events_p_before_' || to_char(tomorrow AT TIME ZONE 'UTC', 'YYYYMMDD'), tomorrow);
END
$$;

INSERT INTO events (seq, id, key, type, event_time, payload, content_type, attributes,
                    partition, ingest_time, store_time, producer, event_time_nanos, tenant)
OVERRIDING SYSTEM VALUE
SELECT seq, id, key, type, event_time, payload, content_type, attributes, partition,
       ingest_time, store_time, producer, event_time_nanos, tenant
FROM events_unpartitioned;
INSERT INTO event_ids (tenant, id, ingest_time, seq)
SELECT tenant, id, ingest_time, seq FROM events_unpartitioned;
-- The new identity continues where the old one stopped (its last value, not the highest stored
-- seq: a rolled-back insert's seq is never handed out again either).
DO $$
DECLARE
    last bigint;
    called boolean;
BEGIN
    EXECUTE format('SELECT last_value, is_called FROM %s',
                   pg_get_serial_sequence('events_unpartitioned', 'seq'))
        INTO last, called;
    PERFORM setval(pg_get_serial_sequence('events', 'seq'), last, called);
END
$$;

DROP TABLE events_unpartitioned;
