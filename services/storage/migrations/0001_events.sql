-- The event store. `id` is the idempotency key end to end; `seq` is store order, assigned in batch
-- order inside one INSERT, so it increases with publish order within a key and drives pagination.
CREATE TABLE events (
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    id           text PRIMARY KEY,
    key          text NOT NULL,
    type         text NOT NULL,
    event_time   timestamptz NOT NULL,
    payload      bytea NOT NULL,
    content_type text NOT NULL,
    attributes   jsonb NOT NULL DEFAULT '{}',
    partition    integer NOT NULL,
    ingest_time  timestamptz NOT NULL,
    store_time   timestamptz NOT NULL DEFAULT now(),
    producer     text NOT NULL
);

-- Keyset pagination walks seq; every filter index ends in seq so a page is one ordered range scan.
CREATE UNIQUE INDEX events_seq_idx ON events (seq);
CREATE INDEX events_key_seq_idx ON events (key, seq);
CREATE INDEX events_type_seq_idx ON events (type, seq);
CREATE INDEX events_event_time_idx ON events (event_time);
