-- The processors' engine checkpoints (services/storage/engine_output_store.py): per queue
-- partition, the engine's state (open windows, partial matches, watermark) and the last queue
-- entry it covers, written in the same transaction as the outputs that state emitted, so a new
-- owner resumes exactly where the last committed batch ended. Not led by a tenant: a
-- partition's state holds the windows and rules of every tenant whose keys hash to it.
--
-- lease_epoch fences the writers: a write changes the row only when the writer's epoch is at
-- least the stored one, and a writer whose epoch is lower is refused (FAILED_PRECONDITION) with
-- its whole transaction, outputs included. A new owner raises the epoch when it loads the
-- checkpoint, so the previous owner's late writes are refused from then on; before the new
-- owner's first save the row holds only that fence (snapshot NULL, entry position -1-1). The
-- entry id is also kept as its two numbers, so "not behind the stored checkpoint" compares in
-- stream order.
CREATE TABLE engine_checkpoints (
    stream        text COLLATE "C" NOT NULL,
    partition     integer NOT NULL CHECK (partition >= 0),
    lease_epoch   bigint NOT NULL CHECK (lease_epoch >= 1),
    last_entry_id text NOT NULL,
    entry_ms      numeric(20) NOT NULL,
    entry_seq     numeric(20) NOT NULL,
    snapshot      bytea,
    saved_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, partition)
);
