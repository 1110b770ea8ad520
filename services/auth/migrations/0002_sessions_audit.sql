-- Disabled accounts, recovery codes, sessions with refresh-token families, signing-key rotation
-- and the audit log. Runs with search_path set to the auth schema, so names are unqualified.
-- No column holds a secret in the clear: recovery codes and refresh tokens are stored as hashes.

ALTER TABLE users ADD COLUMN disabled_at timestamptz;

-- One-time codes that replace a TOTP code; HMAC-SHA-256 (keyed by the secret key file) of
-- "<user id>:<code>". A code is spent by setting used_at, exactly once.
CREATE TABLE recovery_codes (
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash   bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    used_at     timestamptz,
    PRIMARY KEY (user_id, code_hash)
);

-- A session is what one login opened; its id is the `sid` claim of every access token issued
-- in it, and it is the family of all the refresh tokens that rotated out of each other.
CREATE TABLE sessions (
    id                  uuid PRIMARY KEY,
    user_id             uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- Absolute end, however often the session is refreshed.
    expires_at          timestamptz NOT NULL,
    -- Expiry of the current refresh token: a session left unrefreshed that long is over.
    refresh_expires_at  timestamptz NOT NULL,
    refreshed_at        timestamptz,
    generation          integer NOT NULL DEFAULT 0,
    revoked_at          timestamptz,
    revoked_reason      text,
    CONSTRAINT sessions_revoked_has_reason CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL))
);

CREATE INDEX sessions_live_by_user ON sessions (user_id) WHERE revoked_at IS NULL;

-- Every refresh token ever issued in a session, by SHA-256 of the token (256 random bits, so a
-- plain hash suffices). A token is spent (used_at set) when it is rotated; presenting a spent
-- token again means it was copied, and the whole session is revoked (RFC 9700 4.14.2).
CREATE TABLE refresh_tokens (
    token_hash  bytea PRIMARY KEY,
    session_id  uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    generation  integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);

CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);

-- When a key stopped being the active one: it stays published for the overlap window after that.
ALTER TABLE signing_keys ADD COLUMN deactivated_at timestamptz;

-- Security events: who did what to whom, with which outcome. Never a password, code, token,
-- challenge or secret.
CREATE TABLE audit_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    uuid NOT NULL UNIQUE,
    occurred_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor       text NOT NULL,
    subject     text NOT NULL DEFAULT '',
    action      text NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('success', 'failure', 'denied')),
    reason      text NOT NULL DEFAULT '',
    source      text NOT NULL DEFAULT '',
    details     jsonb NOT NULL DEFAULT '{}'
);

-- Newest first, with or without the common filters (keyset pagination on (occurred_at, id)).
CREATE INDEX audit_events_by_time ON audit_events (occurred_at DESC, id DESC);
CREATE INDEX audit_events_by_subject ON audit_events (subject, occurred_at DESC, id DESC);
CREATE INDEX audit_events_by_actor ON audit_events (actor, occurred_at DESC, id DESC);
CREATE INDEX audit_events_by_action ON audit_events (action, occurred_at DESC, id DESC);
