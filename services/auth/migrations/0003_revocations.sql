-- Revocation of access tokens before they expire (AuthService/WatchRevocations).
-- Runs with search_path set to the auth schema, so names are unqualified.

-- Every access token carries its user's generation as the `gen` claim. Disabling a user,
-- revoking their sessions, changing their roles or resetting their MFA raises it, and the
-- gateways refuse the user's tokens of a lower generation: exact, with no clock involved.
ALTER TABLE users ADD COLUMN token_generation bigint NOT NULL DEFAULT 0;

-- The feed the gateways follow. A row is written in the same transaction as the change it
-- announces, under an advisory lock, so ids become visible in commit order and a reader that
-- remembers the last id it saw misses nothing. Rows are deleted once every token they concern
-- has expired (access-token TTL plus a margin).
CREATE TABLE revocations (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('session', 'user_tokens')),
    -- The session id (kind session) or the user id (kind user_tokens).
    subject     text NOT NULL,
    -- For user_tokens: tokens whose generation is below this are refused.
    generation  bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX revocations_by_time ON revocations (created_at);
