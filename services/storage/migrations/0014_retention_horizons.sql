-- How far the retention has removed each tenant's events (services/storage/retention.py), so
-- that a page token or a resume token whose position fell off the retention is refused with
-- OUT_OF_RANGE instead of silently continuing past the removed events (the etcd watch rule:
-- a watch from a compacted revision fails, it never skips).
--
-- Written by the retention itself (services/storage/partitions.py), in the transaction that
-- makes events disappear: the DETACH of an expired partition (the rows vanish from `events`
-- at its commit) and each batch DELETE of the default partition's and the tenants' expired
-- rows (the same statement). So no reader can see the rows gone without seeing the horizon
-- that covers them.
--
-- removed_through_seq: the highest seq the retention removed for the tenant (seq does not
-- follow ingest_time exactly: a lagging processor stores an old day's event after newer
-- ones). generation: bumped by every removal, carried in tokens, so a token is refused only
-- for removals after it was issued (a removal before it cannot make it skip anything).
-- One row per tenant that ever lost events to the retention; never deleted.
CREATE TABLE retention_horizons (
    tenant              text COLLATE "C" PRIMARY KEY,
    generation          bigint NOT NULL,
    removed_through_seq bigint NOT NULL,
    removed_before      timestamptz NOT NULL,
    removed_at          timestamptz NOT NULL DEFAULT now()
);
