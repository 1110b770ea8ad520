-- Dead letters: queue entries the processor gave up on. The processor writes the row before it
-- acknowledges the entry, so this table is the record; the Redis stream <prefix>:dead is only a
-- capped notification. (stream, entry_id) is the idempotency key of StoreDeadLetter.
CREATE TABLE dead_letters (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream          text NOT NULL,
    partition       integer NOT NULL,
    entry_id        text NOT NULL,
    event_ids       text[] NOT NULL DEFAULT '{}',
    -- The serialized QueuedBatch; NULL when the entry did not decode (see raw_fields).
    batch           bytea,
    -- The entry's fields when it did not decode: [{"name": base64, "value": base64}, ...].
    raw_fields      jsonb,
    error           text NOT NULL,
    delivery_count  integer NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at  timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    replayed_at     timestamptz,
    replay_count    integer NOT NULL DEFAULT 0,
    replayed_by     text,
    CONSTRAINT dead_letters_entry_key UNIQUE (stream, entry_id)
);

-- Listing is newest first (id descending), optionally per partition or not yet replayed.
CREATE INDEX dead_letters_partition_id_idx ON dead_letters (partition, id);
CREATE INDEX dead_letters_pending_id_idx ON dead_letters (id) WHERE replayed_at IS NULL;
