-- Payload filters parse the payload at query time (services/storage/queries.py), not at insert.
-- A payload_json column written on insert (generated from the function below, so the INSERT
-- statement stays as it is) cost storage's INSERT +10% to +21% of Postgres CPU per event
-- (14.9-15.4 us -> 16.4-18.6 us), +18% to +29% with a GIN index on it, +25% to +31% with one on
-- attributes too (scripts/bench_payload_json.py: 100k rows in 2,000-row batches, two runs on a
-- shared machine) against a budget of 10% for tenants, partitioning and validation together.
-- A plain cast in the INSERT would be cheaper but would refuse a whole batch over one payload
-- that is not JSON. Queries always name a tenant and walk one of the tenant-led btree indexes,
-- so the parse runs only on rows that index range already selected.
--
-- payload_jsonb is the one place a payload becomes jsonb: NULL for a content type that is not
-- JSON (empty, application/json, anything +json; parameters ignored, as ingest decides), and
-- NULL for bytes that are not UTF-8 or not JSON Postgres can hold (a \u0000 escape, nesting
-- past the stack limit), so no stored payload can make a query fail. The exception block costs
-- a subtransaction per call, paid only for rows a payload filter reads. IMMUTABLE: the result
-- depends on the arguments alone (the database encoding is fixed at creation), so an expression
-- index could be built on it later for a hot path.
CREATE FUNCTION payload_jsonb(content_type text, payload bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    media text := lower(btrim(split_part(content_type, ';', 1)));
BEGIN
    IF NOT (media IN ('', 'application/json') OR media LIKE '%+json') THEN
        RETURN NULL;
    END IF;
    RETURN convert_from(payload, 'UTF8')::jsonb;
EXCEPTION WHEN data_exception OR program_limit_exceeded THEN
    RETURN NULL;
END
$$;
