-- event_time keeps the nanoseconds of the API's google.protobuf.Timestamp: timestamptz holds
-- microseconds, and event_time_nanos the nanoseconds below event_time's microsecond (0..999).
-- Queries order instants by (event_time, event_time_nanos). Rows stored before this version had
-- their nanoseconds cut, and keep 0 here. A constant default adds the column without a rewrite.
ALTER TABLE events ADD COLUMN event_time_nanos smallint NOT NULL DEFAULT 0;

-- Releases before this version bound event times as Python datetimes, and asyncpg encodes the
-- first and the last microsecond of the range (0001-01-01T00:00:00Z, 9999-12-31T23:59:59.999999Z)
-- as -infinity and infinity. Those rows meant exactly these instants; put them back (through
-- the event_time index: only such rows are touched).
UPDATE events SET event_time = '9999-12-31 23:59:59.999999+00' WHERE event_time = 'infinity';
UPDATE events SET event_time = '0001-01-01 00:00:00+00' WHERE event_time = '-infinity';
