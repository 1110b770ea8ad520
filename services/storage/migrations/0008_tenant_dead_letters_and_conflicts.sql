-- Dead letters belong to the tenant of their entry (ingest writes one tenant per entry), so that
-- a tenant sees only its own and a replay publishes them into it again. Rows recorded before,
-- and entries that did not decode (their tenant is unknown), belong to `default`, where the
-- platform administrators are. Every key leads with the tenant, as in `events` (0007), except
-- (stream, entry_id): the processor's idempotency key for its record, which it must find again
-- even for an entry whose tenant it cannot read.
ALTER TABLE dead_letters ADD COLUMN tenant text COLLATE "C" NOT NULL DEFAULT 'default';

ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_pkey;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_pkey PRIMARY KEY (tenant, id);

-- Listing is newest first (id descending) inside one tenant, optionally per partition or not
-- yet replayed.
DROP INDEX dead_letters_partition_id_idx;
DROP INDEX dead_letters_pending_id_idx;
CREATE INDEX dead_letters_tenant_partition_id_idx ON dead_letters (tenant, partition, id);
CREATE INDEX dead_letters_tenant_pending_id_idx ON dead_letters (tenant, id)
    WHERE replayed_at IS NULL;

-- Conflicts storage saw: an event skipped because its (tenant, id) was stored already, whose
-- content differs from the stored one (key, type, content type, payload, attributes, or an
-- event time the producer set). The stored event stays; this is the record that the second
-- was not kept. Ingest refuses most of them at publish time (its idempotency window); these
-- are the ones it could not see: beyond the window, or the id published again under another
-- key (another partition). No payload is kept, only its SHA-256 and length. One row per
-- refused publish: a re-delivery of the same queue entry has the same ingest time and
-- producer, so it adds nothing.
CREATE TABLE event_conflicts (
    tenant         text COLLATE "C" NOT NULL,
    id             text COLLATE "C" NOT NULL,
    ingest_time    timestamptz NOT NULL,
    producer       text NOT NULL,
    key            text COLLATE "C" NOT NULL,
    type           text COLLATE "C" NOT NULL,
    payload_sha256 bytea NOT NULL,
    payload_bytes  integer NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT event_conflicts_pkey PRIMARY KEY (tenant, id, ingest_time, producer)
);

CREATE INDEX event_conflicts_tenant_recorded_idx ON event_conflicts (tenant, recorded_at);
