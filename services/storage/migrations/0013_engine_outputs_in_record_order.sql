-- Alerts and window results get a record order that a live tail can follow (SubscribeAlerts
-- and SubscribeWindowResults, services/storage/output_subscriptions.py). Alerts' listing
-- order, the last causing event's time, is not one: a lagging partition records an alert about older events after a newer alert,
-- and a tail keyed on it would pass that alert for good. And the deterministic alert_id, which
-- makes a redelivered batch write nothing twice, is no order at all. So, as for events
-- (migration 0011, services/storage/queries.py PAGING_GUARANTEE): seq from an identity with
-- CACHE 1, and store_time read after it (clock_timestamp(), the next column in the insert's
-- projection); a tail returns an alert only when its store_time is before the start of every
-- transaction still writing the table. Existing alerts are numbered by this statement, which
-- waits for every writer of the table (its lock conflicts with theirs): all of them get lower
-- seqs than any alert recorded later.
ALTER TABLE alerts
    ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY (CACHE 1),
    ADD COLUMN store_time timestamptz NOT NULL DEFAULT clock_timestamp();
CREATE UNIQUE INDEX alerts_by_seq ON alerts (tenant, seq);
-- Window results likewise (SubscribeWindowResults): their listing order (window start, then
-- version, partition, group) is no record order either.
ALTER TABLE window_results
    ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY (CACHE 1),
    ADD COLUMN store_time timestamptz NOT NULL DEFAULT clock_timestamp();
CREATE UNIQUE INDEX window_results_by_seq ON window_results (tenant, seq);
