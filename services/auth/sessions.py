"""Sessions: what a login opens, a refresh rotates and a logout ends.

A refresh token is `smr_` + 32 random bytes (url-safe base64), handed out once and stored only as
its SHA-256. Every refresh spends the presented token and hands out the next one of the same
session (family). A spent token presented again means two parties hold the family's tokens, and
nobody can tell which is legitimate, so the whole session is revoked: the newest token stops
working too (RFC 9700 4.14.2). Lifetimes: a refresh token lives `refresh_token_ttl_seconds`
(30 days; an idle session ends then), and no session outlives `session_max_seconds` (90 days)
however often it is refreshed. Access tokens carry the session id as `sid` and the user's token
generation as `gen`; ending a session or raising the generation revokes them at the gateways
within seconds (see services.auth.revocations), and otherwise they run out (5 minutes).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import uuid
from dataclasses import dataclass

from services.auth.audit import AuditLog, Outcome
from services.auth.origin import Origin
from services.auth.session_store import RefreshOutcome, SessionStore
from services.auth.store import UserRecord
from services.auth.tokens import AccessToken, TokenIssuer
from streammesh.mesh.errors import Unauthenticated

__all__ = ["INVALID_REFRESH_TOKEN", "REFRESH_TOKEN_PREFIX", "SessionTokens", "Sessions"]

log = logging.getLogger(__name__)

REFRESH_TOKEN_PREFIX = "smr_"  # noqa: S105 (a format marker, not a secret)
INVALID_REFRESH_TOKEN = "invalid or expired refresh token"  # noqa: S105 (an error message)
_FORMAT = re.compile(rf"{REFRESH_TOKEN_PREFIX}[A-Za-z0-9_-]{{43}}")


@dataclass(frozen=True)
class SessionTokens:
    """What a login or refresh hands out."""

    access: AccessToken
    refresh_token: str
    refresh_expires_in: int
    roles: tuple[str, ...]
    session_id: uuid.UUID
    tenant: str


def _new_refresh_token() -> tuple[str, bytes]:
    token = REFRESH_TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, _hash(token)


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Sessions:
    """Opens, refreshes and ends sessions, and audits each refresh and logout."""

    def __init__(self, store: SessionStore, issuer: TokenIssuer, audit: AuditLog) -> None:
        self._store = store
        self._issuer = issuer
        self._audit = audit

    async def open(self, user: UserRecord) -> SessionTokens:
        """A new session for `user` (both factors checked) and its first tokens."""
        refresh, refresh_hash = _new_refresh_token()
        opened = await self._store.open(user.id, refresh_hash)
        access = await self._issue(user, opened.session_id)
        log.info("session %s opened for user %s", opened.session_id, user.id)
        return SessionTokens(
            access, refresh, opened.refresh_expires_in, user.roles, opened.session_id, user.tenant
        )

    async def refresh(self, token: str, origin: Origin) -> SessionTokens:
        """Spend `token` and hand out the next tokens of its session, or UNAUTHENTICATED."""
        if not _FORMAT.fullmatch(token):
            await self._audit.record(
                origin.event("refresh", Outcome.FAILURE, reason=RefreshOutcome.UNKNOWN.value)
            )
            raise Unauthenticated(INVALID_REFRESH_TOKEN)
        new_token, new_hash = _new_refresh_token()
        result = await self._store.rotate(_hash(token), new_hash)
        subject = result.user.username if result.user is not None else ""
        tenant = result.user.tenant if result.user is not None else ""
        details = {"session_id": str(result.session_id)} if result.session_id else {}
        if result.outcome is not RefreshOutcome.ROTATED:
            if result.outcome is RefreshOutcome.REUSED:
                details["family_revoked"] = "now" if result.revoked_now else "before"
                log.warning("refresh token reuse: session %s revoked", result.session_id)
            await self._audit.record(
                origin.event(
                    "refresh",
                    Outcome.FAILURE,
                    subject=subject,
                    reason=result.outcome.value,
                    details=details,
                    tenant=tenant,
                )
            )
            raise Unauthenticated(INVALID_REFRESH_TOKEN)
        assert result.user is not None and result.session_id is not None
        access = await self._issue(result.user, result.session_id)
        await self._audit.record(
            origin.event(
                "refresh", Outcome.SUCCESS, subject=subject, details=details, tenant=tenant
            )
        )
        return SessionTokens(
            access,
            new_token,
            result.refresh_expires_in,
            result.user.roles,
            result.session_id,
            result.user.tenant,
        )

    async def logout(self, token: str, origin: Origin) -> None:
        """End the session of `token`. A spent token ends it too, but is refused (reuse)."""
        result = (
            await self._store.revoke_by_token(_hash(token), "logout")
            if _FORMAT.fullmatch(token)
            else None
        )
        if result is None or result.outcome is RefreshOutcome.UNKNOWN:
            await self._audit.record(
                origin.event("logout", Outcome.FAILURE, reason=RefreshOutcome.UNKNOWN.value)
            )
            raise Unauthenticated(INVALID_REFRESH_TOKEN)
        subject = result.user.username if result.user is not None else ""
        tenant = result.user.tenant if result.user is not None else ""
        details = {"session_id": str(result.session_id)}
        if result.outcome is RefreshOutcome.REUSED:
            details["family_revoked"] = "now" if result.revoked_now else "before"
            await self._audit.record(
                origin.event(
                    "logout",
                    Outcome.FAILURE,
                    subject=subject,
                    reason=RefreshOutcome.REUSED.value,
                    details=details,
                    tenant=tenant,
                )
            )
            raise Unauthenticated(INVALID_REFRESH_TOKEN)
        if not result.revoked_now:
            details["already_ended"] = "true"
        await self._audit.record(
            origin.event("logout", Outcome.SUCCESS, subject=subject, details=details, tenant=tenant)
        )

    async def revoke_user(self, user_id: uuid.UUID, reason: str) -> int:
        """End every live session of a user; returns how many."""
        return await self._store.revoke_user(user_id, reason)

    async def sweep(self, retention_seconds: float) -> int:
        """Forget sessions that ended more than `retention_seconds` ago."""
        return await self._store.sweep(retention_seconds)

    async def _issue(self, user: UserRecord, session_id: uuid.UUID) -> AccessToken:
        return await self._issuer.issue(
            subject=str(user.id),
            username=user.username,
            roles=user.roles,
            session_id=str(session_id),
            generation=user.token_generation,
            tenant=user.tenant,
            tenant_generation=user.tenant_generation,
        )
