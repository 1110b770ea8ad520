"""SQL for users and their recovery codes (SQLAlchemy Core over asyncpg), in auth's own schema.

Every write that depends on what was read before is a compare-and-set (`WHERE <column> = <value
read>`), so two replicas acting on the same user at once cannot overwrite each other's work, and
every "use once" value (a TOTP time step, a recovery code) is spent by one conditional UPDATE
whose row count says who won.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.auth.revocations import Kind, record
from services.auth.tables import recovery_codes, tenants, users
from streammesh.mesh.postgres import load_migrations, migrate
from streammesh.mesh.tenancy import DEFAULT_TENANT

__all__ = ["USER_COLUMNS", "AuthStore", "UserRecord", "account_name", "user_record"]

MIGRATIONS_PACKAGE = "services.auth.migrations"


def account_name(tenant: str, username: str) -> str:
    """An account's name for throttling and lockout: the username in tenant "default" (as
    before tenants existed), `<tenant>/<username>` elsewhere ('/' is in no username)."""
    return username if tenant == DEFAULT_TENANT else f"{tenant}/{username}"


@dataclass(frozen=True)
class UserRecord:
    """A user row; secrets are still sealed (see crypto.SecretBox)."""

    id: uuid.UUID
    username: str
    password_hash: str
    roles: tuple[str, ...]
    totp_pending_secret: bytes | None
    totp_secret: bytes | None
    totp_last_step: int | None
    created_at: dt.datetime | None = None
    disabled_at: dt.datetime | None = None
    token_generation: int = 0
    """The `gen` claim of the user's access tokens; raised to revoke the older ones."""
    tenant: str = DEFAULT_TENANT
    tenant_disabled: bool = False
    """Whether the user's tenant is disabled (read with the user; False when not read)."""
    tenant_generation: int = 0
    """The `tgen` claim of the tenant's access tokens (see tenants.TenantStore)."""

    @property
    def account(self) -> str:
        """The account's name for throttling and lockout (see `account_name`)."""
        return account_name(self.tenant, self.username)

    @property
    def totp_enabled(self) -> bool:
        """The schema keeps an active secret exactly when TOTP is enabled."""
        return self.totp_secret is not None

    @property
    def disabled(self) -> bool:
        """A disabled user can neither log in nor refresh a session."""
        return self.disabled_at is not None


USER_COLUMNS = (
    tenants.c.disabled_at.label("tenant_disabled_at"),
    tenants.c.token_generation.label("tenant_generation"),
)
"""The tenant's state read with a user (join `tenants` on users.tenant_id)."""


def user_record(row: Row[Any]) -> UserRecord:
    """A UserRecord from a row of `users` (optionally with USER_COLUMNS)."""
    mapping = row._mapping
    return UserRecord(
        id=row.id,
        username=row.username,
        password_hash=row.password_hash,
        roles=tuple(row.roles),
        totp_pending_secret=row.totp_pending_secret,
        totp_secret=row.totp_secret,
        totp_last_step=row.totp_last_step,
        created_at=row.created_at,
        disabled_at=row.disabled_at,
        token_generation=row.token_generation,
        tenant=row.tenant_id,
        tenant_disabled=mapping.get("tenant_disabled_at") is not None,
        tenant_generation=int(mapping.get("tenant_generation") or 0),
    )


def _select_users() -> Any:
    return select(users, *USER_COLUMNS).join(tenants, tenants.c.id == users.c.tenant_id)


class AuthStore:
    """Users and recovery codes in the auth schema."""

    def __init__(self, engine: AsyncEngine, *, schema: str) -> None:
        self._engine = engine
        self._schema = schema

    async def migrate(self) -> list[int]:
        """Create the schema and apply pending migrations; returns the versions applied now."""
        return await migrate(
            self._engine, schema=self._schema, migrations=load_migrations(MIGRATIONS_PACKAGE)
        )

    async def create_user(
        self,
        *,
        user_id: uuid.UUID,
        username: str,
        password_hash: str,
        roles: Sequence[str],
        tenant: str = DEFAULT_TENANT,
    ) -> bool:
        """Insert a user into an existing tenant; False when the (lower-case) username is taken
        in that tenant."""
        statement = (
            insert(users)
            .values(
                id=user_id,
                tenant_id=tenant,
                username=username,
                password_hash=password_hash,
                roles=list(roles),
                created_at=func.now(),
                updated_at=func.now(),
            )
            .on_conflict_do_nothing(index_elements=[users.c.tenant_id, users.c.username])
            .returning(users.c.id)
        )
        async with self._engine.begin() as conn:
            return (await conn.execute(statement)).first() is not None

    async def get_user(self, username: str, *, tenant: str = DEFAULT_TENANT) -> UserRecord | None:
        """The user of `tenant` with this (lower-case) username, if any."""
        statement = _select_users().where(users.c.tenant_id == tenant, users.c.username == username)
        async with self._engine.connect() as conn:
            row = (await conn.execute(statement)).first()
        return None if row is None else user_record(row)

    async def get_user_by_id(self, user_id: uuid.UUID) -> UserRecord | None:
        """The user with this id, if any."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(_select_users().where(users.c.id == user_id))).first()
        return None if row is None else user_record(row)

    async def list_users(
        self, *, after: str, prefix: str, limit: int, tenant: str = DEFAULT_TENANT
    ) -> list[UserRecord]:
        """Up to `limit` users of `tenant` with usernames after `after` that start with
        `prefix`, by name."""
        statement = (
            _select_users()
            .where(users.c.tenant_id == tenant)
            .order_by(users.c.username)
            .limit(limit)
        )
        if after:
            statement = statement.where(users.c.username > after)
        if prefix:
            statement = statement.where(users.c.username.startswith(prefix, autoescape=True))
        async with self._engine.connect() as conn:
            return [user_record(row) for row in await conn.execute(statement)]

    # TOTP and recovery codes

    async def set_pending_totp(self, user_id: uuid.UUID, sealed_secret: bytes) -> bool:
        """Replace the pending secret; False when TOTP got enabled meanwhile."""
        return await self._update_user(
            user_id,
            users.c.totp_enabled_at.is_(None),
            totp_pending_secret=sealed_secret,
        )

    async def activate_totp(
        self,
        user_id: uuid.UUID,
        *,
        pending: bytes,
        sealed_secret: bytes,
        step: int,
        recovery_hashes: Sequence[bytes],
    ) -> bool:
        """Make the pending secret active, spend the confirming code's `step`, and replace the
        recovery codes, in one transaction; False unless `pending` is still the pending one."""
        statement = (
            update(users)
            .where(
                users.c.id == user_id,
                users.c.totp_enabled_at.is_(None),
                users.c.totp_pending_secret == pending,
            )
            .values(
                totp_secret=sealed_secret,
                totp_pending_secret=None,
                totp_enabled_at=func.now(),
                totp_last_step=step,
                updated_at=func.now(),
            )
            .returning(users.c.id)
        )
        async with self._engine.begin() as conn:
            if (await conn.execute(statement)).first() is None:
                return False
            await self._replace_recovery_codes(conn, user_id, recovery_hashes)
        return True

    async def consume_totp_step(self, user_id: uuid.UUID, step: int) -> bool:
        """Record `step` as used; False when it, or a later step, was used already.

        One conditional UPDATE: of two concurrent logins with the same code, exactly one sees
        its row come back.
        """
        return await self._update_user(
            user_id,
            users.c.totp_enabled_at.is_not(None),
            (users.c.totp_last_step.is_(None)) | (users.c.totp_last_step < step),
            totp_last_step=step,
        )

    async def consume_recovery_code(self, user_id: uuid.UUID, code_hash: bytes) -> bool:
        """Spend an unused recovery code of this user; False when there is no such code."""
        statement = (
            update(recovery_codes)
            .where(
                recovery_codes.c.user_id == user_id,
                recovery_codes.c.code_hash == code_hash,
                recovery_codes.c.used_at.is_(None),
            )
            .values(used_at=func.now())
            .returning(recovery_codes.c.user_id)
        )
        async with self._engine.begin() as conn:
            return (await conn.execute(statement)).first() is not None

    async def unused_recovery_codes(self, user_id: uuid.UUID) -> int:
        """How many recovery codes the user has left."""
        statement = select(func.count()).where(
            recovery_codes.c.user_id == user_id, recovery_codes.c.used_at.is_(None)
        )
        async with self._engine.connect() as conn:
            return int((await conn.execute(statement)).scalar_one())

    async def reset_mfa(self, user_id: uuid.UUID) -> UserRecord | None:
        """Remove TOTP (active and pending) and every recovery code, and revoke the user's access
        tokens; None if no such user."""
        statement = (
            update(users)
            .where(users.c.id == user_id)
            .values(
                totp_secret=None,
                totp_pending_secret=None,
                totp_enabled_at=None,
                totp_last_step=None,
                updated_at=func.now(),
                token_generation=users.c.token_generation + 1,
            )
            .returning(*users.c)
        )
        async with self._engine.begin() as conn:
            row = (await conn.execute(statement)).first()
            await self._replace_recovery_codes(conn, user_id, ())
            if row is not None:
                await record(conn, Kind.USER_TOKENS, str(user_id), generation=row.token_generation)
        return None if row is None else user_record(row)

    @staticmethod
    async def _replace_recovery_codes(
        conn: AsyncConnection, user_id: uuid.UUID, hashes: Sequence[bytes]
    ) -> None:
        await conn.execute(delete(recovery_codes).where(recovery_codes.c.user_id == user_id))
        if hashes:
            await conn.execute(
                insert(recovery_codes),
                [{"user_id": user_id, "code_hash": h} for h in hashes],
            )

    # Administration

    async def set_disabled(self, user_id: uuid.UUID, disabled: bool) -> UserRecord | None:
        """Disable (keeping the first disabling time, revoking the user's access tokens) or
        enable; None if no such user."""
        if not disabled:
            return await self._update_returning(user_id, disabled_at=None)
        value = func.coalesce(users.c.disabled_at, func.now())
        return await self._update_returning(user_id, revoke_tokens=True, disabled_at=value)

    async def set_roles(self, user_id: uuid.UUID, roles: Sequence[str]) -> UserRecord | None:
        """Replace the user's roles and revoke their access tokens (which carry the old ones);
        None if no such user. The session stays: the next refresh carries the new roles."""
        return await self._update_returning(user_id, revoke_tokens=True, roles=list(roles))

    async def replace_password_hash(self, user_id: uuid.UUID, *, old: str, new: str) -> bool:
        """Swap in a re-hashed password; False when the hash changed meanwhile."""
        return await self._update_user(user_id, users.c.password_hash == old, password_hash=new)

    async def _update_returning(
        self, user_id: uuid.UUID, *, revoke_tokens: bool = False, **values: Any
    ) -> UserRecord | None:
        if revoke_tokens:
            values["token_generation"] = users.c.token_generation + 1
        statement = (
            update(users)
            .where(users.c.id == user_id)
            .values(**values, updated_at=func.now())
            .returning(*users.c)
        )
        async with self._engine.begin() as conn:
            row = (await conn.execute(statement)).first()
            if row is not None and revoke_tokens:
                await record(conn, Kind.USER_TOKENS, str(user_id), generation=row.token_generation)
        return None if row is None else user_record(row)

    async def _update_user(self, user_id: uuid.UUID, *conditions: Any, **values: Any) -> bool:
        statement = (
            update(users)
            .where(users.c.id == user_id, *conditions)
            .values(**values, updated_at=func.now())
            .returning(users.c.id)
        )
        async with self._engine.begin() as conn:
            return (await conn.execute(statement)).first() is not None
