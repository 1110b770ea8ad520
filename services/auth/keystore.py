"""SQL for the token-signing keys: bootstrap, rotation, retirement and the published set.

Every change to the set of keys runs in a transaction holding one advisory lock named after the
schema, so replicas starting, rotating or retiring at once act one after the other, and a
scheduled rotation that two replicas both find due is done by the first one only (the second
re-checks under the lock and finds a fresh key).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Interval, Row, func, literal, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.auth.tables import signing_keys

__all__ = ["KeyStore", "RetireOutcome", "RotationResult", "SigningKeyRecord"]


@dataclass(frozen=True)
class SigningKeyRecord:
    """A signing key row; the private key is sealed."""

    kid: str
    alg: str
    sealed_private_key: bytes
    public_jwk: dict[str, str]
    active: bool
    created_at: dt.datetime | None = None
    retired_at: dt.datetime | None = None
    deactivated_at: dt.datetime | None = None


@dataclass(frozen=True)
class RotationResult:
    """What a rotation did: the new active key (None when none was due) and the keys retired."""

    active: SigningKeyRecord | None
    retired: list[SigningKeyRecord]


@dataclass(frozen=True)
class RetireOutcome:
    """`key` is None when no key has that kid; `refused` when it is the active key."""

    key: SigningKeyRecord | None
    refused: bool = False


def _record(row: Row[Any]) -> SigningKeyRecord:
    return SigningKeyRecord(
        kid=row.kid,
        alg=row.alg,
        sealed_private_key=row.private_key,
        public_jwk=dict(row.public_jwk),
        active=row.active,
        created_at=row.created_at,
        retired_at=row.retired_at,
        deactivated_at=row.deactivated_at,
    )


def _seconds(value: float) -> Any:
    return literal(dt.timedelta(seconds=value), Interval())


class KeyStore:
    """Signing keys in the auth schema."""

    def __init__(self, engine: AsyncEngine, *, schema: str) -> None:
        self._engine = engine
        self._lock_name = f"auth-signing-keys:{schema}"

    async def _lock(self, conn: AsyncConnection) -> None:
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": self._lock_name}
        )

    async def ensure_active(self, candidate: SigningKeyRecord) -> SigningKeyRecord:
        """The active key, or `candidate` stored as the active key when there is none.

        Replicas starting together serialize on the lock and only the first one inserts. (The
        partial unique index would refuse a second active key anyway, but as an error.)
        """
        async with self._engine.begin() as conn:
            await self._lock(conn)
            row = (await conn.execute(select(signing_keys).where(signing_keys.c.active))).first()
            if row is not None:
                return _record(row)
            return await self._insert_active(conn, candidate)

    async def active(self) -> SigningKeyRecord | None:
        """The key new tokens are signed with."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(signing_keys).where(signing_keys.c.active))).first()
        return None if row is None else _record(row)

    async def published(self) -> list[SigningKeyRecord]:
        """Every key that is not retired (the JWKS), oldest first."""
        statement = (
            select(signing_keys)
            .where(signing_keys.c.retired_at.is_(None))
            .order_by(signing_keys.c.created_at, signing_keys.c.kid)
        )
        async with self._engine.connect() as conn:
            return [_record(row) for row in await conn.execute(statement)]

    async def all(self) -> list[SigningKeyRecord]:
        """Every key, retired ones included, newest first."""
        statement = select(signing_keys).order_by(
            signing_keys.c.created_at.desc(), signing_keys.c.kid
        )
        async with self._engine.connect() as conn:
            return [_record(row) for row in await conn.execute(statement)]

    async def rotate(
        self,
        candidate: SigningKeyRecord,
        *,
        overlap_seconds: float,
        if_older_than_seconds: float | None = None,
    ) -> RotationResult:
        """Make `candidate` the active key, then retire replaced keys past their overlap window.

        With `if_older_than_seconds` the rotation happens only if the active key is at least that
        old (checked under the lock, so concurrent schedulers rotate once); retirement of keys
        whose window has passed happens either way.
        """
        async with self._engine.begin() as conn:
            await self._lock(conn)
            new_active: SigningKeyRecord | None = None
            due = True
            if if_older_than_seconds is not None:
                fresh = await conn.execute(
                    select(signing_keys.c.kid).where(
                        signing_keys.c.active,
                        signing_keys.c.created_at > func.now() - _seconds(if_older_than_seconds),
                    )
                )
                due = fresh.first() is None
            if due:
                await conn.execute(
                    update(signing_keys)
                    .where(signing_keys.c.active)
                    .values(active=False, deactivated_at=func.now())
                )
                new_active = await self._insert_active(conn, candidate)
            retired = await self._retire_expired(conn, overlap_seconds)
        return RotationResult(active=new_active, retired=retired)

    async def retire_expired(self, *, overlap_seconds: float) -> list[SigningKeyRecord]:
        """Retire the replaced keys whose overlap window has passed."""
        async with self._engine.begin() as conn:
            await self._lock(conn)
            return await self._retire_expired(conn, overlap_seconds)

    async def retire(self, kid: str) -> RetireOutcome:
        """Stop publishing `kid` now (idempotent); the active key is refused."""
        async with self._engine.begin() as conn:
            await self._lock(conn)
            row = (
                await conn.execute(
                    select(signing_keys).where(signing_keys.c.kid == kid).with_for_update()
                )
            ).first()
            if row is None:
                return RetireOutcome(key=None)
            if row.active:
                return RetireOutcome(key=_record(row), refused=True)
            if row.retired_at is not None:
                return RetireOutcome(key=_record(row))
            retired = (
                await conn.execute(
                    update(signing_keys)
                    .where(signing_keys.c.kid == kid)
                    .values(retired_at=func.now())
                    .returning(*signing_keys.c)
                )
            ).one()
        return RetireOutcome(key=_record(retired))

    @staticmethod
    async def _insert_active(
        conn: AsyncConnection, candidate: SigningKeyRecord
    ) -> SigningKeyRecord:
        inserted = await conn.execute(
            insert(signing_keys)
            .values(
                kid=candidate.kid,
                alg=candidate.alg,
                private_key=candidate.sealed_private_key,
                public_jwk=candidate.public_jwk,
                active=True,
                created_at=func.now(),
            )
            .returning(*signing_keys.c)
        )
        return _record(inserted.one())

    @staticmethod
    async def _retire_expired(
        conn: AsyncConnection, overlap_seconds: float
    ) -> list[SigningKeyRecord]:
        deactivated = func.coalesce(signing_keys.c.deactivated_at, signing_keys.c.created_at)
        rows = await conn.execute(
            update(signing_keys)
            .where(
                ~signing_keys.c.active,
                signing_keys.c.retired_at.is_(None),
                deactivated <= func.now() - _seconds(overlap_seconds),
            )
            .values(retired_at=func.now())
            .returning(*signing_keys.c)
        )
        return sorted((_record(row) for row in rows), key=lambda key: key.kid)
