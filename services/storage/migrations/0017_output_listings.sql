-- ListLateEvents (services/storage/output_queries.py): a tenant's late events newest event time
-- first, paged by keyset over exactly these columns (a backward scan); the AIP-160 filter
-- narrows what that range scan reads. The primary key, led by source and definition, serves
-- no listing order across definitions.
CREATE INDEX late_events_by_time ON late_events
    (tenant, event_time_nanos, source, definition_id, definition_version, event_id,
     window_start_nanos);

-- ListAlerts of one rule (the request's rule_id): newest first within the rule, instead of a
-- backward walk over every alert of the tenant that skips the other rules' ones.
CREATE INDEX alerts_by_rule ON alerts (tenant, rule_id, last_event_nanos, alert_id);
