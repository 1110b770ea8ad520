-- Events belong to a tenant, and every key of the table leads with it: the column the store will
-- later be distributed by (Citus-style), so each write and each query names one tenant and stays
-- on one shard. Idempotency is per tenant: (tenant, id), so one tenant's id never suppresses
-- another's event. Rows stored before tenants existed, and queue entries written before ingest
-- set a tenant, belong to `default`.
ALTER TABLE events ADD COLUMN tenant text COLLATE "C" NOT NULL DEFAULT 'default';

ALTER TABLE events DROP CONSTRAINT events_pkey;
ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (tenant, id);

-- The same index count as before, each led by the tenant: keyset pages walk seq inside one
-- tenant, by key, by type, or over all its events; time ranges use (tenant, event_time, event_time_nanos), the order instants compare in.
DROP INDEX events_seq_idx;
DROP INDEX events_key_seq_idx;
DROP INDEX events_type_seq_idx;
DROP INDEX events_event_time_idx;
CREATE INDEX events_tenant_seq_idx ON events (tenant, seq);
CREATE INDEX events_tenant_key_seq_idx ON events (tenant, key, seq);
CREATE INDEX events_tenant_type_seq_idx ON events (tenant, type, seq);
CREATE INDEX events_tenant_event_time_idx ON events (tenant, event_time, event_time_nanos);
