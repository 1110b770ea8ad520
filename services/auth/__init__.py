"""The auth service: users, argon2id password hashes, TOTP with one-time recovery codes, the
two-step login (password -> challenge -> second factor), sessions with rotating refresh tokens,
Ed25519 signing keys with rotation and the JWKS, throttling and lockout shared through Redis, and
the audit log.

Module map: `service`/`admin_service` (handlers) -> `accounts`, `sessions`, `admin` (flows) ->
`store`, `session_store`, `keystore`, `audit` (Postgres), `challenges`, `throttle` (Redis);
`crypto`, `passwords`, `totp`, `recovery`, `tokens` hold the primitives; `server` wires it all.
"""
