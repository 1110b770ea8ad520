"""Tenants in auth's schema: create, read, list, disable and enable.

A tenant is an id (the slug its users type at login, and the `tenant` claim of their access
tokens; it never changes), a display name and a state. Disabling raises the tenant's token
generation and announces it on the revocation feed in the same transaction, so the gateways
refuse every access token of the tenant issued before (their `tgen` claim is lower) within
seconds, with no clock involved; the tokens issued after a re-enable carry the new generation
and pass. Refreshes and logins check the state itself.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from services.auth.revocations import Kind, record
from services.auth.tables import tenants

__all__ = ["TenantRecord", "TenantStore"]


@dataclass(frozen=True)
class TenantRecord:
    """A tenants row."""

    id: str
    display_name: str
    created_at: dt.datetime
    disabled_at: dt.datetime | None
    token_generation: int

    @property
    def disabled(self) -> bool:
        """A disabled tenant's users cannot log in or refresh; their tokens are refused."""
        return self.disabled_at is not None


def _tenant(row: Row[Any]) -> TenantRecord:
    return TenantRecord(
        id=row.id,
        display_name=row.display_name,
        created_at=row.created_at,
        disabled_at=row.disabled_at,
        token_generation=row.token_generation,
    )


class TenantStore:
    """The tenants table."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def create(self, tenant_id: str, display_name: str) -> TenantRecord | None:
        """A new enabled tenant; None when the id is taken."""
        statement = (
            insert(tenants)
            .values(
                id=tenant_id,
                display_name=display_name,
                created_at=func.now(),
                token_generation=0,
            )
            .on_conflict_do_nothing(index_elements=[tenants.c.id])
            .returning(*tenants.c)
        )
        async with self._engine.begin() as conn:
            row = (await conn.execute(statement)).first()
        return None if row is None else _tenant(row)

    async def get(self, tenant_id: str) -> TenantRecord | None:
        """The tenant with this id, if any."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(tenants).where(tenants.c.id == tenant_id))).first()
        return None if row is None else _tenant(row)

    async def list(self, *, after: str, limit: int) -> list[TenantRecord]:
        """Up to `limit` tenants with ids after `after`, by id."""
        statement = select(tenants).order_by(tenants.c.id).limit(limit)
        if after:
            statement = statement.where(tenants.c.id > after)
        async with self._engine.connect() as conn:
            return [_tenant(row) for row in await conn.execute(statement)]

    async def set_disabled(self, tenant_id: str, disabled: bool) -> TenantRecord | None:
        """Disable (keeping the first disabling time, revoking the tenant's access tokens) or
        enable; None if no such tenant."""
        values: dict[str, Any] = {"disabled_at": None}
        if disabled:
            values = {
                "disabled_at": func.coalesce(tenants.c.disabled_at, func.now()),
                "token_generation": tenants.c.token_generation + 1,
            }
        statement = (
            update(tenants).where(tenants.c.id == tenant_id).values(**values).returning(*tenants.c)
        )
        async with self._engine.begin() as conn:
            row = (await conn.execute(statement)).first()
            if row is not None and disabled:
                await record(conn, Kind.TENANT_TOKENS, tenant_id, generation=row.token_generation)
        return None if row is None else _tenant(row)
