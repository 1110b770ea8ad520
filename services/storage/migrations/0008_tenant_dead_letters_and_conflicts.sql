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
