"""SQL for sessions and their refresh-token families.

A session row is the family; `refresh_tokens` holds the SHA-256 of every refresh token issued in
it. Rotation and reuse detection run in one transaction that locks the session row (FOR UPDATE),
so two refreshes of one family are decided one after the other: the second presenter of the same
token finds it spent, which is reuse, and the family is revoked.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Interval, Row, func, literal, select, update
from sqlalchemy import delete as sql_delete
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.auth.revocations import Kind, record
from services.auth.store import USER_COLUMNS, UserRecord
from services.auth.tables import refresh_tokens, sessions, tenants, users

__all__ = ["OpenedSession", "RefreshOutcome", "RefreshResult", "SessionStore"]


class RefreshOutcome(enum.Enum):
    """How a presented refresh token was judged; the value is the audit reason of failures."""

    ROTATED = "rotated"
    UNKNOWN = "unknown_token"
    REUSED = "reuse_detected"
    REVOKED = "session_revoked"
    EXPIRED = "expired"
    DISABLED = "user_disabled"
    TENANT_DISABLED = "tenant_disabled"


@dataclass(frozen=True)
class OpenedSession:
    """A session and the lifetime of its current refresh token (seconds)."""

    session_id: uuid.UUID
    refresh_expires_in: int


@dataclass(frozen=True)
class RefreshResult:
    """The judgement, the session and user concerned (when known), and for ROTATED the new
    token's lifetime. For REUSED, `revoked_now` says whether this call ended the session."""

    outcome: RefreshOutcome
    session_id: uuid.UUID | None = None
    user: UserRecord | None = None
    refresh_expires_in: int = 0
    revoked_now: bool = False


def _seconds(value: float) -> Any:
    return literal(dt.timedelta(seconds=value), Interval())


def _user_from(row: Row[*tuple[Any, ...]]) -> UserRecord:
    """The user columns of a refresh lookup (no secrets are read for a refresh)."""
    return UserRecord(
        id=row.user_id,
        username=row.username,
        password_hash="",
        roles=tuple(row.roles),
        totp_pending_secret=None,
        totp_secret=None,
        totp_last_step=None,
        disabled_at=row.disabled_at,
        token_generation=row.token_generation,
        tenant=row.tenant_id,
        tenant_disabled=row.tenant_disabled_at is not None,
        tenant_generation=row.tenant_generation,
    )


class SessionStore:
    """Sessions and refresh tokens in the auth schema."""

    def __init__(
        self, engine: AsyncEngine, *, refresh_ttl_seconds: int, session_max_seconds: int
    ) -> None:
        self._engine = engine
        self._refresh_ttl = refresh_ttl_seconds
        self._max_age = session_max_seconds

    async def open(self, user_id: uuid.UUID, token_hash: bytes) -> OpenedSession:
        """A new session of `user_id` whose first refresh token has hash `token_hash`."""
        session_id = uuid.uuid4()
        refresh_expires = func.least(
            func.now() + _seconds(self._refresh_ttl), func.now() + _seconds(self._max_age)
        )
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    insert(sessions)
                    .values(
                        id=session_id,
                        user_id=user_id,
                        created_at=func.now(),
                        expires_at=func.now() + _seconds(self._max_age),
                        refresh_expires_at=refresh_expires,
                        generation=0,
                    )
                    .returning(sessions.c.refresh_expires_at, func.now().label("now"))
                )
            ).one()
            await conn.execute(
                insert(refresh_tokens).values(
                    token_hash=token_hash,
                    session_id=session_id,
                    generation=0,
                    created_at=func.now(),
                    expires_at=row.refresh_expires_at,
                )
            )
        return OpenedSession(session_id, int((row.refresh_expires_at - row.now).total_seconds()))

    async def rotate(self, token_hash: bytes, new_hash: bytes) -> RefreshResult:
        """Spend the token `token_hash` and issue `new_hash` in its session, or say why not.

        Presenting a spent token revokes its session (the whole family, the newest token too).
        """
        now = func.now()
        lookup = (
            select(
                refresh_tokens.c.session_id,
                refresh_tokens.c.used_at,
                (refresh_tokens.c.expires_at <= now).label("token_expired"),
                (sessions.c.expires_at <= now).label("session_expired"),
                sessions.c.expires_at,
                sessions.c.revoked_at,
                sessions.c.generation,
                sessions.c.user_id,
                users.c.username,
                users.c.roles,
                users.c.disabled_at,
                users.c.token_generation,
                users.c.tenant_id,
                *USER_COLUMNS,
                now.label("now"),
            )
            .join(sessions, sessions.c.id == refresh_tokens.c.session_id)
            .join(users, users.c.id == sessions.c.user_id)
            .join(tenants, tenants.c.id == users.c.tenant_id)
            .where(refresh_tokens.c.token_hash == token_hash)
            # Both rows locked: a concurrent refresh of the same token waits here, and then
            # reads the token row as the first one left it (spent).
            .with_for_update(of=[refresh_tokens, sessions])
        )
        async with self._engine.begin() as conn:
            row = (await conn.execute(lookup)).first()
            if row is None:
                return RefreshResult(RefreshOutcome.UNKNOWN)
            user = _user_from(row)
            session_id: uuid.UUID = row.session_id
            if row.used_at is not None:
                return await self._reused(conn, session_id, user)
            if row.revoked_at is not None:
                return RefreshResult(RefreshOutcome.REVOKED, session_id, user)
            if row.token_expired or row.session_expired:
                return RefreshResult(RefreshOutcome.EXPIRED, session_id, user)
            if user.disabled:
                return RefreshResult(RefreshOutcome.DISABLED, session_id, user)
            if user.tenant_disabled:
                return RefreshResult(RefreshOutcome.TENANT_DISABLED, session_id, user)
            new_expiry = min(row.now + dt.timedelta(seconds=self._refresh_ttl), row.expires_at)
            generation = row.generation + 1
            spent = await conn.execute(
                update(refresh_tokens)
                .where(
                    refresh_tokens.c.token_hash == token_hash, refresh_tokens.c.used_at.is_(None)
                )
                .values(used_at=now)
                .returning(refresh_tokens.c.session_id)
            )
            if spent.first() is None:  # spent meanwhile: never two successors of one token
                return await self._reused(conn, session_id, user)
            await conn.execute(
                insert(refresh_tokens).values(
                    token_hash=new_hash,
                    session_id=session_id,
                    generation=generation,
                    created_at=now,
                    expires_at=new_expiry,
                )
            )
            await conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id)
                .values(generation=generation, refreshed_at=now, refresh_expires_at=new_expiry)
            )
        return RefreshResult(
            RefreshOutcome.ROTATED,
            session_id,
            user,
            refresh_expires_in=int((new_expiry - row.now).total_seconds()),
        )

    @staticmethod
    async def _reused(
        conn: AsyncConnection, session_id: uuid.UUID, user: UserRecord
    ) -> RefreshResult:
        revoked = await conn.execute(
            update(sessions)
            .where(sessions.c.id == session_id, sessions.c.revoked_at.is_(None))
            .values(revoked_at=func.now(), revoked_reason=RefreshOutcome.REUSED.value)
            .returning(sessions.c.id)
        )
        revoked_now = revoked.first() is not None
        if revoked_now:  # whoever holds the copied tokens loses the access tokens too
            await record(conn, Kind.SESSION, str(session_id))
        return RefreshResult(RefreshOutcome.REUSED, session_id, user, revoked_now=revoked_now)

    async def revoke_by_token(self, token_hash: bytes, reason: str) -> RefreshResult:
        """End the session of a refresh token (current or spent). ROTATED means the token was
        the current one; REUSED that it was spent; UNKNOWN that no session has it."""
        lookup = (
            select(
                refresh_tokens.c.session_id,
                refresh_tokens.c.used_at,
                sessions.c.user_id,
                users.c.username,
                users.c.roles,
                users.c.disabled_at,
                users.c.token_generation,
                users.c.tenant_id,
                *USER_COLUMNS,
            )
            .join(sessions, sessions.c.id == refresh_tokens.c.session_id)
            .join(users, users.c.id == sessions.c.user_id)
            .join(tenants, tenants.c.id == users.c.tenant_id)
            .where(refresh_tokens.c.token_hash == token_hash)
        )
        async with self._engine.begin() as conn:
            row = (await conn.execute(lookup)).first()
            if row is None:
                return RefreshResult(RefreshOutcome.UNKNOWN)
            spent = row.used_at is not None
            revoked = await conn.execute(
                update(sessions)
                .where(sessions.c.id == row.session_id, sessions.c.revoked_at.is_(None))
                .values(
                    revoked_at=func.now(),
                    revoked_reason=RefreshOutcome.REUSED.value if spent else reason,
                )
                .returning(sessions.c.user_id)
            )
            revoked_now = revoked.first() is not None
            if revoked_now:
                await record(conn, Kind.SESSION, str(row.session_id))
        return RefreshResult(
            RefreshOutcome.REUSED if spent else RefreshOutcome.ROTATED,
            row.session_id,
            _user_from(row),
            revoked_now=revoked_now,
        )

    async def revoke_user(self, user_id: uuid.UUID, reason: str) -> int:
        """End every live session of a user and revoke all their access tokens (a new token
        generation); returns how many sessions were live."""
        statement = (
            update(sessions)
            .where(sessions.c.user_id == user_id, sessions.c.revoked_at.is_(None))
            .where(sessions.c.expires_at > func.now(), sessions.c.refresh_expires_at > func.now())
            .values(revoked_at=func.now(), revoked_reason=reason)
            .returning(sessions.c.id)
        )
        bump = (
            update(users)
            .where(users.c.id == user_id)
            .values(token_generation=users.c.token_generation + 1)
            .returning(users.c.token_generation)
        )
        async with self._engine.begin() as conn:
            ended = len((await conn.execute(statement)).all())
            generation = (await conn.execute(bump)).scalar_one_or_none()
            if generation is not None:
                await record(conn, Kind.USER_TOKENS, str(user_id), generation=generation)
        return ended

    async def sweep(self, retention_seconds: float) -> int:
        """Delete sessions (and their tokens) over for longer than `retention_seconds`."""
        cutoff = func.now() - _seconds(retention_seconds)
        statement = sql_delete(sessions).where(
            (sessions.c.expires_at < cutoff)
            | (sessions.c.refresh_expires_at < cutoff)
            | (sessions.c.revoked_at < cutoff)
        )
        async with self._engine.begin() as conn:
            result = await conn.execute(statement)
        return int(result.rowcount)
