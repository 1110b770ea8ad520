"""SQLAlchemy Core descriptions of the auth tables. The SQL files in `migrations/` create them;
these mirror them for building statements (unqualified: the engine's search_path is the schema)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    Uuid,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

__all__ = [
    "audit_events",
    "recovery_codes",
    "refresh_tokens",
    "revocations",
    "sessions",
    "signing_keys",
    "tenants",
    "users",
]

_metadata = MetaData()


def _time(name: str, *, nullable: bool = True) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


tenants = Table(
    "tenants",
    _metadata,
    Column("id", Text, primary_key=True),
    Column("display_name", Text, nullable=False),
    _time("created_at", nullable=False),
    _time("disabled_at"),
    Column("token_generation", BigInteger, nullable=False),
)

users = Table(
    "users",
    _metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Text, ForeignKey("tenants.id"), nullable=False),
    Column("username", Text, nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("roles", ARRAY(Text), nullable=False),
    Column("totp_pending_secret", LargeBinary),
    Column("totp_secret", LargeBinary),
    _time("totp_enabled_at"),
    Column("totp_last_step", BigInteger),
    _time("created_at", nullable=False),
    _time("updated_at", nullable=False),
    _time("disabled_at"),
    Column("token_generation", BigInteger, nullable=False),
)

recovery_codes = Table(
    "recovery_codes",
    _metadata,
    Column("user_id", Uuid, ForeignKey("users.id"), primary_key=True),
    Column("code_hash", LargeBinary, primary_key=True),
    _time("created_at", nullable=False),
    _time("used_at"),
)

sessions = Table(
    "sessions",
    _metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id"), nullable=False),
    _time("created_at", nullable=False),
    _time("expires_at", nullable=False),
    _time("refresh_expires_at", nullable=False),
    _time("refreshed_at"),
    Column("generation", Integer, nullable=False),
    _time("revoked_at"),
    Column("revoked_reason", Text),
)

refresh_tokens = Table(
    "refresh_tokens",
    _metadata,
    Column("token_hash", LargeBinary, primary_key=True),
    Column("session_id", Uuid, ForeignKey("sessions.id"), nullable=False),
    Column("generation", Integer, nullable=False),
    _time("created_at", nullable=False),
    _time("expires_at", nullable=False),
    _time("used_at"),
)

signing_keys = Table(
    "signing_keys",
    _metadata,
    Column("kid", Text, primary_key=True),
    Column("alg", Text, nullable=False),
    Column("private_key", LargeBinary, nullable=False),
    Column("public_jwk", JSONB, nullable=False),
    Column("active", Boolean, nullable=False),
    _time("created_at", nullable=False),
    _time("retired_at"),
    _time("deactivated_at"),
)

audit_events = Table(
    "audit_events",
    _metadata,
    Column("id", BigInteger, primary_key=True),
    Column("event_id", Uuid, nullable=False, unique=True),
    _time("occurred_at", nullable=False),
    Column("actor", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("details", JSONB, nullable=False),
    Column("tenant", Text, nullable=False),
)

revocations = Table(
    "revocations",
    _metadata,
    Column("id", BigInteger, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("generation", BigInteger, nullable=False),
    _time("created_at", nullable=False),
)
