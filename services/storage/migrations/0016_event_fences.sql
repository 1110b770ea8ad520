-- The lease fence of StoreEvents (services/storage/event_fences.py): per queue partition, the
-- highest lease epoch a processor stored under. A StoreEvents request that names its epochs
-- (StoreEventsRequest.fences) raises them here in the insert's own statement, and a request
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
-- Raised by the fenced insert (services/storage/sql.py, FENCED_INSERTS) when one of its fences
-- was not raised: names the first stale partition and the stored epoch. VOLATILE, so its query
-- sees an epoch the new owner committed after the insert's statement began.
CREATE FUNCTION event_fence_refused(streams text[], partitions int4[], epochs int8[])
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    stale record;
BEGIN
    SELECT w.stream, w.partition, w.lease_epoch, f.lease_epoch AS stored INTO stale
    FROM unnest(streams, partitions, epochs) AS w(stream, partition, lease_epoch)
    JOIN event_fences AS f ON f.stream = w.stream AND f.partition = w.partition
    WHERE f.lease_epoch > w.lease_epoch
    ORDER BY w.stream, w.partition
    LIMIT 1;
    IF NOT FOUND THEN
        SELECT streams[1] AS stream, partitions[1] AS partition, epochs[1] AS lease_epoch,
               0 AS stored INTO stale;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'SMF01',
        MESSAGE = format(
            'events of %s partition %s: lease epoch %s is older than the stored epoch %s;'
            ' the partition has a newer owner, nothing was written',
            stale.stream, stale.partition, stale.lease_epoch, stale.stored);
END
$$;
