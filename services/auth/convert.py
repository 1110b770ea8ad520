"""Domain values to and from the auth protobuf messages."""

from __future__ import annotations

import datetime as dt
import uuid

from google.protobuf import duration_pb2, timestamp_pb2

from services.auth.admin import UserView
from services.auth.audit import AuditEvent
from services.auth.keystore import SigningKeyRecord
from services.auth.sessions import SessionTokens
from services.auth.tenants import TenantRecord
from streammesh.api.auth.v1 import auth_pb2

__all__ = [
    "BEARER",
    "audit_event_from_proto",
    "audit_event_message",
    "duration",
    "jwk_message",
    "session_tokens_message",
    "signing_key_message",
    "tenant_message",
    "timestamp",
    "user_message",
]

BEARER = "Bearer"
_JWK_FIELDS = tuple(auth_pb2.JsonWebKey.DESCRIPTOR.fields_by_name)


def duration(seconds: float) -> duration_pb2.Duration:
    """A Duration of `seconds` (nanosecond precision)."""
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def timestamp(moment: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp, or None to leave the field unset."""
    if moment is None:
        return None
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(moment)
    return value


def session_tokens_message(tokens: SessionTokens) -> auth_pb2.SessionTokens:
    return auth_pb2.SessionTokens(
        access_token=tokens.access.token,
        token_type=BEARER,
        expires_in=duration(tokens.access.expires_in),
        refresh_token=tokens.refresh_token,
        refresh_expires_in=duration(tokens.refresh_expires_in),
        roles=list(tokens.roles),
        tenant=tokens.tenant,
    )


def user_message(view: UserView, *, now: dt.datetime | None = None) -> auth_pb2.User:
    user = view.user
    locked_until = None
    if view.locked_for is not None:
        locked_until = (now or dt.datetime.now(dt.UTC)) + dt.timedelta(seconds=view.locked_for)
    return auth_pb2.User(
        user_id=str(user.id),
        username=user.username,
        roles=list(user.roles),
        disabled=user.disabled,
        mfa_enabled=user.totp_enabled,
        created_at=timestamp(user.created_at),
        locked_until=timestamp(locked_until),
        tenant=user.tenant,
    )


def tenant_message(tenant: TenantRecord) -> auth_pb2.Tenant:
    return auth_pb2.Tenant(
        tenant_id=tenant.id,
        display_name=tenant.display_name,
        disabled=tenant.disabled,
        created_at=timestamp(tenant.created_at),
        disabled_at=timestamp(tenant.disabled_at),
    )


def signing_key_message(key: SigningKeyRecord) -> auth_pb2.SigningKey:
    return auth_pb2.SigningKey(
        kid=key.kid,
        alg=key.alg,
        active=key.active,
        created_at=timestamp(key.created_at),
        retired_at=timestamp(key.retired_at),
    )


def jwk_message(jwk: dict[str, str]) -> auth_pb2.JsonWebKey:
    return auth_pb2.JsonWebKey(**{name: jwk[name] for name in _JWK_FIELDS if name in jwk})


def audit_event_message(event: AuditEvent) -> auth_pb2.AuditEvent:
    return auth_pb2.AuditEvent(
        event_id=str(event.event_id or ""),
        time=timestamp(event.time),
        actor=event.actor,
        subject=event.subject,
        action=event.action,
        outcome=event.outcome,
        reason=event.reason,
        source=event.source,
        details=dict(event.details),
        tenant=event.tenant,
    )


def audit_event_from_proto(
    message: auth_pb2.AuditEvent, *, event_id: uuid.UUID, time: dt.datetime | None
) -> AuditEvent:
    """The event as reported (identifiers already checked by the caller)."""
    return AuditEvent(
        actor=message.actor,
        action=message.action,
        outcome=message.outcome,
        subject=message.subject,
        reason=message.reason,
        source=message.source,
        details=dict(message.details),
        event_id=event_id,
        time=time,
        tenant=message.tenant,
    )
