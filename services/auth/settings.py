"""Auth settings (env prefix STREAMMESH_AUTH_), built once in `main()` and passed down."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.auth.roles import ROLES
from streammesh.mesh.settings import ServiceSettings, default_state_dir

__all__ = ["AuthSettings", "available_cpus"]

_DAY = 24 * 3600


def available_cpus() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset`
    narrow), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


class AuthSettings(ServiceSettings):
    """Where auth keeps its data and secrets, what its tokens say, and its security limits."""

    model_config = SettingsConfigDict(env_prefix="STREAMMESH_AUTH_", frozen=True, extra="ignore")

    port: int = Field(default=50052, ge=0, le=65535, description="port; 0 picks a free one")
    database_url: str = Field(
        default="postgresql+asyncpg://postgres@127.0.0.1:5432/streammesh",
        description="Postgres database holding the auth schema",
    )
    db_schema: str = Field(
        default="auth",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="the schema auth owns; no other service reads it",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis shared by all auth replicas: login challenges and throttle state",
    )
    redis_prefix: str = Field(
        default="streammesh:auth:",
        min_length=1,
        max_length=100,
        description="every Redis key auth writes starts with this",
    )
    secret_key_file: Path = Field(
        default_factory=lambda: default_state_dir() / "secrets" / "auth-secret-key",
        description="mode-0600 file with the url-safe base64 key that encrypts secrets at rest; "
        "default $STREAMMESH_STATE_DIR/secrets/auth-secret-key",
    )
    issuer: str = Field(default="streammesh-auth", min_length=1, description="`iss` of tokens")
    audience: str = Field(default="streammesh", min_length=1, description="`aud` of tokens")
    access_token_ttl_seconds: int = Field(
        default=300, ge=30, le=3600, description="lifetime of an access token"
    )
    refresh_token_ttl_seconds: int = Field(
        default=30 * _DAY,
        ge=60,
        le=365 * _DAY,
        description="a session not refreshed for this long ends (idle timeout)",
    )
    session_max_seconds: int = Field(
        default=90 * _DAY,
        ge=60,
        le=365 * _DAY,
        description="absolute lifetime of a session, however often it is refreshed",
    )
    login_challenge_ttl_seconds: float = Field(
        default=300, gt=0, le=3600, description="how long a StartLogin challenge can be answered"
    )
    default_roles: tuple[str, ...] = Field(
        default=(),
        description="roles a self-registered user gets; none by default: an admin grants them",
    )
    totp_issuer: str = Field(
        default="StreamMesh", min_length=1, description="issuer shown by authenticator apps"
    )
    lockout_threshold: int = Field(
        default=10,
        ge=1,
        le=50,
        description="consecutive failed attempts (password or second factor) that lock an account",
    )
    lockout_seconds: float = Field(
        default=900, gt=0, le=_DAY, description="how long a locked account stays locked"
    )
    failure_window_seconds: float = Field(
        default=_DAY,
        gt=0,
        le=30 * _DAY,
        description="failure counters are forgotten after this long without a new failure",
    )
    backoff_free_failures: int = Field(
        default=3,
        ge=0,
        le=50,
        description="failures per account before the exponential delay starts (typos)",
    )
    source_free_failures: int = Field(
        default=10,
        ge=0,
        le=1000,
        description="failures (and registrations) per source address before its exponential "
        "delay starts",
    )
    backoff_base_seconds: float = Field(
        default=1.0, ge=0, le=60, description="first delay; each further failure doubles it"
    )
    backoff_max_seconds: float = Field(
        default=300, ge=0, le=_DAY, description="the delay never grows beyond this"
    )
    hash_concurrency: int = Field(
        default_factory=available_cpus,
        ge=1,
        le=1024,
        description="argon2 hashes and verifications run at once (19 MiB each); default: the "
        "cores this process may use",
    )
    key_rotation_days: int = Field(
        default=30, ge=0, le=3650, description="rotate the signing key this often; 0 = never"
    )
    key_overlap_seconds: int | None = Field(
        default=None,
        ge=0,
        description="how long a replaced key stays published; default 2 x access-token TTL",
    )
    maintenance_interval_seconds: float = Field(
        default=60,
        gt=0,
        le=_DAY,
        description="how often the background task checks key rotation and expired sessions",
    )

    revocation_poll_seconds: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="how often each WatchRevocations stream looks for new revocations",
    )
    revocation_heartbeat_seconds: float = Field(
        default=0.5,
        gt=0,
        le=10,
        description="WatchRevocations sends a heartbeat this often while nothing is revoked",
    )
    revocation_retention_margin_seconds: float = Field(
        default=120,
        ge=0,
        le=_DAY,
        description=(
            "revocations are kept for the access-token TTL plus this; it must cover the "
            "gateway's token leeway and the clock skew between auth and the gateways"
        ),
    )

    @field_validator("default_roles")
    @classmethod
    def _known_roles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - ROLES)
        if unknown:
            raise ValueError(f"unknown roles {unknown}; known: {sorted(ROLES)}")
        return value

    @property
    def revocation_retention(self) -> float:
        """Seconds a revocation is served: past that, every token it concerns has expired."""
        return self.access_token_ttl_seconds + self.revocation_retention_margin_seconds

    @property
    def key_overlap(self) -> int:
        """Seconds a replaced signing key stays published (tokens it signed keep verifying)."""
        if self.key_overlap_seconds is not None:
            return self.key_overlap_seconds
        return 2 * self.access_token_ttl_seconds
