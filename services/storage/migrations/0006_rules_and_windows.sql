-- Rule and window definitions (services/storage/definition_store.py), and the tables of what the
-- processor's engine emits (services/storage/engine_output_store.py). Every key leads with the
-- tenant, the column the store will later be distributed by.
--
-- One table holds both kinds of definition: they share their life (versions, enabling, the
-- change log the processors follow) and differ only in the document, which the shared parser
-- (streammesh.definitions) checks before a row is written. A version is never changed: an
-- update or an enable/disable writes the next version, so the engine, which applies rule
-- versions by activation time, sees every change as a new immutable version.
CREATE TABLE definitions (
    tenant        text COLLATE "C" NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('rule', 'window')),
    definition_id text COLLATE "C" NOT NULL,
    version       integer NOT NULL CHECK (version >= 1),
    -- The document the engine runs, with tenant, id and version (and a rule's enabled) as stored.
    definition    jsonb NOT NULL,
    enabled       boolean NOT NULL,
    -- A rule's activation (event time, ns since the epoch) when its document names one.
    activation_nanos bigint,
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- Serves GetDefinition (one version, or the latest by a backward scan) and ListDefinitions
    -- (the latest version of each id, in id order, a page at a time).
    PRIMARY KEY (tenant, kind, definition_id, version)
);

-- What changed, for the processors (ListDefinitionChanges), as schema_changes is for ingest:
-- writers lock the table in EXCLUSIVE mode before inserting, so change ids become visible in id
-- order and a poller continuing after the highest id it saw never misses one.
CREATE TABLE definition_changes (
    change_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant        text COLLATE "C" NOT NULL,
    kind          text NOT NULL,
    definition_id text COLLATE "C" NOT NULL,
    version       integer NOT NULL,
    changed_at    timestamptz NOT NULL DEFAULT now()
);

-- Alerts of the pattern rules. alert_id is deterministic (rule version, key, causing events), so
-- a replay inserts nothing new (ON CONFLICT DO NOTHING).
CREATE TABLE alerts (
    tenant          text COLLATE "C" NOT NULL,
    alert_id        text COLLATE "C" NOT NULL,
    rule_id         text COLLATE "C" NOT NULL,
    rule_version    integer NOT NULL,
    rule_kind       text NOT NULL,
    key             text COLLATE "C" NOT NULL,
    first_event_nanos bigint NOT NULL,
    last_event_nanos  bigint NOT NULL,
    event_ids       text[] NOT NULL,
    detail          jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, alert_id)
);
-- ListAlerts: a tenant's alerts newest first (by the last causing event), paged by keyset
-- (a backward scan); the optional rule filter is applied on that scan.
CREATE INDEX alerts_by_time ON alerts (tenant, last_event_nanos, alert_id);

-- Window results; the key is the engine's result identity, so a replay writes nothing twice.
CREATE TABLE window_results (
    tenant          text COLLATE "C" NOT NULL,
    window_id       text COLLATE "C" NOT NULL,
    window_version  integer NOT NULL,
    partition       integer NOT NULL,
    group_key       text COLLATE "C" NOT NULL,
    start_nanos     bigint NOT NULL,
    end_nanos       bigint NOT NULL,
    revision        integer NOT NULL,
    "values"        jsonb NOT NULL,
    watermark_nanos bigint NOT NULL,
    retracted       boolean NOT NULL DEFAULT false,
    emitted_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, window_id, window_version, partition, group_key, start_nanos, end_nanos,
                 revision)
);
-- ListWindowResults: one window's results (every version and partition) in start order, paged
-- by keyset over exactly these columns.
CREATE INDEX window_results_by_start ON window_results
    (tenant, window_id, start_nanos, window_version, partition, group_key, end_nanos, revision);

-- Events that missed a window (beyond its allowed lateness) or came at or before a pattern
-- partition's watermark: one row per (source, definition version, event, window start); a rule's
-- late event has window_start_nanos 0.
CREATE TABLE late_events (
    tenant          text COLLATE "C" NOT NULL,
    source          text NOT NULL CHECK (source IN ('window', 'rule')),
    definition_id   text COLLATE "C" NOT NULL,
    definition_version integer NOT NULL,
    event_id        text COLLATE "C" NOT NULL,
    window_start_nanos bigint NOT NULL,
    window_end_nanos   bigint NOT NULL,
    event_key       text COLLATE "C" NOT NULL,
    event_time_nanos bigint NOT NULL,
    watermark_nanos bigint NOT NULL,
    reason          text NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    -- The key is the identity (a replay writes nothing twice); no other index until a query
    -- reads late events (the key's prefix serves "late events of one definition").
    PRIMARY KEY (tenant, source, definition_id, definition_version, event_id, window_start_nanos)
);

-- Left for the worker wiring step (not created here, as nothing writes it yet):
--   CREATE TABLE engine_checkpoints (
--       stream text, partition integer,   -- tenant-less: a partition holds many tenants
--       snapshot bytea, last_entry_id text, lease_epoch bigint, saved_at timestamptz,
--       PRIMARY KEY (stream, partition));
-- written in the same transaction as the outputs, by an UPDATE guarded by lease_epoch <= the
-- writer's epoch (a fenced-out worker's write changes no row and its batch is refused).
