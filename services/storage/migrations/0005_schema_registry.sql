-- The schema registry (services/storage/registry_store.py). Every key leads with the tenant, the
-- column the store will later be distributed by (Citus-style): each statement the registry runs
-- names one tenant, so it stays on one shard. Event types compare byte by byte, as in events.
CREATE TABLE schema_subjects (
    tenant        text COLLATE "C" NOT NULL,
    event_type    text COLLATE "C" NOT NULL,
    compatibility text NOT NULL DEFAULT 'BACKWARD' CHECK (compatibility IN (
        'NONE', 'BACKWARD', 'BACKWARD_TRANSITIVE', 'FORWARD', 'FORWARD_TRANSITIVE', 'FULL',
        'FULL_TRANSITIVE')),
    -- 0 until the first version is registered (the mode may be set before).
    latest_version integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, event_type)
);

CREATE TABLE schema_versions (
    tenant      text COLLATE "C" NOT NULL,
    event_type  text COLLATE "C" NOT NULL,
    version     integer NOT NULL CHECK (version >= 1),
    -- The document as submitted (compact, key order kept): what GetSchema returns.
    schema_text text NOT NULL,
    -- sha256 of the canonical JSON (sorted keys): re-registering the same document is a no-op.
    fingerprint text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, event_type, version),
    CONSTRAINT schema_versions_fingerprint_key UNIQUE (tenant, event_type, fingerprint),
    FOREIGN KEY (tenant, event_type) REFERENCES schema_subjects (tenant, event_type)
);

-- Per-tenant registry settings. A tenant without a row has the defaults (ACCEPT).
CREATE TABLE schema_policies (
    tenant        text COLLATE "C" PRIMARY KEY,
    unknown_types text NOT NULL CHECK (unknown_types IN ('ACCEPT', 'REFUSE')),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- What changed, for ingest's cache (ListSchemaChanges). Writers take an exclusive lock on this
-- table before inserting, so change ids become visible in id order and a poller that continues
-- after the highest id it saw never misses one (registry writes are rare; the lock costs
-- nothing that matters). One small row per registry write, kept. event_type '' is a
-- tenant-wide change (the unknown-type policy).
CREATE TABLE schema_changes (
    change_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant     text COLLATE "C" NOT NULL,
    event_type text COLLATE "C" NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
