-- The lease fence of StoreEvents (services/storage/event_fences.py): per queue partition, the
-- highest lease epoch a processor stored under. A StoreEvents request that names its epochs
-- (StoreEventsRequest.fences) raises them here in the insert's transaction, and a request
-- whose epoch is below the stored one is refused with everything it carried: a processor
-- paused past its lease cannot store after the partition's new owner did. The upsert locks
-- the row until the commit, so the stores of one partition commit one after the other.
-- Separate from engine_checkpoints (which fences the engine's outputs the same way): that row
-- carries the snapshot and is written at checkpoints, this one at every store. A tiny table of
-- one row per partition, updated in place (no indexed column changes: HOT updates).
CREATE TABLE event_fences (
    stream      text COLLATE "C" NOT NULL,
    partition   integer NOT NULL CHECK (partition >= 0),
    lease_epoch bigint NOT NULL CHECK (lease_epoch >= 1),
    PRIMARY KEY (stream, partition)
) WITH (fillfactor = 50);
