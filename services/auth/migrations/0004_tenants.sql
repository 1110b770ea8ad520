-- Tenants: every user belongs to exactly one, usernames are unique per tenant, audit rows and
-- access-token revocations know their tenant. Runs with search_path set to the auth schema.
--
-- Every user that existed before this migration moves to the tenant `default` (created here),
-- which also holds the platform administrators (role `admin`) and every self-registered account.

CREATE TABLE tenants (
    -- The slug users type at login and the access token's `tenant` claim; never changes.
    id                  text PRIMARY KEY CHECK (id ~ '^[a-z][a-z0-9-]{1,31}$'),
    display_name        text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    disabled_at         timestamptz,
    -- The `tgen` claim of the tenant's access tokens; raised when the tenant is disabled, and
    -- the gateways refuse the tenant's tokens of a lower generation (as users.token_generation).
    token_generation    bigint NOT NULL DEFAULT 0
);

INSERT INTO tenants (id, display_name) VALUES ('default', 'Default tenant');

-- The tenant leads the key, so that the table can later be distributed by tenant.
ALTER TABLE users ADD COLUMN tenant_id text NOT NULL DEFAULT 'default' REFERENCES tenants (id);
ALTER TABLE users ALTER COLUMN tenant_id DROP DEFAULT;
ALTER TABLE users DROP CONSTRAINT users_username_key;
ALTER TABLE users ADD CONSTRAINT users_tenant_username_key UNIQUE (tenant_id, username);

-- Which tenant an audit row belongs to: the account's, else the actor's; '' for platform events
-- (key rotation, a refused call without a verified token). A tenant admin reads only its own.
ALTER TABLE audit_events ADD COLUMN tenant text NOT NULL DEFAULT '';
CREATE INDEX audit_events_by_tenant ON audit_events (tenant, occurred_at DESC, id DESC);

ALTER TABLE revocations DROP CONSTRAINT revocations_kind_check;
ALTER TABLE revocations ADD CONSTRAINT revocations_kind_check
    CHECK (kind IN ('session', 'user_tokens', 'tenant_tokens'));
