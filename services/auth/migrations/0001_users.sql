-- Users with their argon2id hash and TOTP state, and the Ed25519 keys that sign access tokens.
-- Runs with search_path set to the auth schema, so names are unqualified.
-- Every secret column holds a crypto.SecretBox envelope (AES-256-GCM), never plaintext.

CREATE TABLE users (
    id                  uuid PRIMARY KEY,
    -- Stored lower-case so that uniqueness is case-insensitive.
    username            text NOT NULL UNIQUE CHECK (username = lower(username)),
    password_hash       text NOT NULL,
    roles               text[] NOT NULL DEFAULT '{}',
    -- Sealed base32 secret awaiting its first code (BeginTotpEnrollment).
    totp_pending_secret bytea,
    -- Sealed active secret; present exactly when TOTP is enabled.
    totp_secret         bytea,
    totp_enabled_at     timestamptz,
    -- Last time step accepted at login: a code is never accepted twice (RFC 6238 5.2).
    totp_last_step      bigint,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_totp_enabled_has_secret
        CHECK ((totp_secret IS NULL) = (totp_enabled_at IS NULL))
);

CREATE TABLE signing_keys (
    -- RFC 7638 JWK thumbprint of the public key.
    kid                 text PRIMARY KEY,
    alg                 text NOT NULL,
    -- Sealed PKCS#8 PEM of the private key.
    private_key         bytea NOT NULL,
    -- Public JWK as published in the JWKS (kty, crv, x, kid, alg, use).
    public_jwk          jsonb NOT NULL,
    -- The one key new tokens are signed with; others are published only to verify older tokens.
    active              boolean NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- Once retired a key is no longer published: tokens it signed stop verifying.
    retired_at          timestamptz,
    CONSTRAINT signing_keys_active_not_retired CHECK (NOT (active AND retired_at IS NOT NULL))
);

-- At most one active key, whatever the application does.
CREATE UNIQUE INDEX signing_keys_one_active ON signing_keys ((true)) WHERE active;
