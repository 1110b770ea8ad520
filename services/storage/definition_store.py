"""All SQL of the rule and window definitions (migrations/0006_rules_and_windows.sql): versions,
listings and the change log the processors follow. Every statement names one tenant except the
change log, which the processors read across tenants.

Writes are serialized by the EXCLUSIVE lock on `definition_changes` that each write takes first
(it is needed anyway so change ids become visible in id order): a write reads the latest version
and adds the next one with no other write in between. Definition writes are rare (people
editing rules), so one lock for all of them costs nothing that matters.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.storage.store import outage_is_unavailable

__all__ = ["DefinitionChangeRow", "DefinitionRow", "DefinitionStore", "NewVersion"]

_COLUMNS = (
    "kind, definition_id, version, definition::text AS definition, enabled, created_by, created_at"
)


@dataclass(frozen=True, slots=True)
class DefinitionRow:
    kind: str
    definition_id: str
    version: int
    definition: dict[str, Any]
    enabled: bool
    created_by: str
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class NewVersion:
    """What a write adds: the document (its tenant, id and version already set)."""

    definition: dict[str, Any]
    enabled: bool
    activation_nanos: int | None


@dataclass(frozen=True, slots=True)
class DefinitionChangeRow:
    change_id: int
    tenant: str
    kind: str
    definition_id: str
    version: int


def _row(row: Any) -> DefinitionRow:
    values = dict(row)
    values["definition"] = json.loads(values["definition"])
    return DefinitionRow(**values)


Build = Callable[[DefinitionRow | None], NewVersion | None]
"""Called with the latest version (None for a new id) inside the write's transaction; returns the
version to add, None to add nothing, or raises to refuse."""


class DefinitionStore:
    """The definition tables of one schema (the engine's search_path)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @staticmethod
    async def _latest(
        conn: AsyncConnection, tenant: str, kind: str, definition_id: str
    ) -> DefinitionRow | None:
        statement = text(
            f"SELECT {_COLUMNS} FROM definitions WHERE tenant = :tenant AND kind = :kind"  # noqa: S608 (fixed terms)
            " AND definition_id = :id ORDER BY version DESC LIMIT 1"
        )
        arguments = {"tenant": tenant, "kind": kind, "id": definition_id}
        row = (await conn.execute(statement, arguments)).mappings().first()
        return None if row is None else _row(row)

    async def write(
        self, tenant: str, kind: str, definition_id: str, *, created_by: str, build: Build
    ) -> tuple[DefinitionRow, bool]:
        """The version `build` made, written (True), or the latest when it made none (False)."""
        async with outage_is_unavailable("definition write"), self._engine.begin() as conn:
            await conn.execute(text("LOCK TABLE definition_changes IN EXCLUSIVE MODE"))
            latest = await self._latest(conn, tenant, kind, definition_id)
            new = build(latest)
            if new is None:
                assert latest is not None, "build must make the first version"
                return latest, False
            version = 1 if latest is None else latest.version + 1
            inserted = (
                (
                    await conn.execute(
                        text(
                            "INSERT INTO definitions (tenant, kind, definition_id, version,"  # noqa: S608 (fixed terms)
                            " definition, enabled, activation_nanos, created_by) VALUES"
                            " (:tenant, :kind, :id, :version, CAST(:definition AS jsonb),"
                            f" :enabled, :activation, :created_by) RETURNING {_COLUMNS}"
                        ),
                        {
                            "tenant": tenant,
                            "kind": kind,
                            "id": definition_id,
                            "version": version,
                            "definition": json.dumps(new.definition, ensure_ascii=False),
                            "enabled": new.enabled,
                            "activation": new.activation_nanos,
                            "created_by": created_by,
                        },
                    )
                )
                .mappings()
                .one()
            )
            await conn.execute(
                text(
                    "INSERT INTO definition_changes (tenant, kind, definition_id, version)"
                    " VALUES (:tenant, :kind, :id, :version)"
                ),
                {"tenant": tenant, "kind": kind, "id": definition_id, "version": version},
            )
            return _row(inserted), True

    async def get(
        self, tenant: str, kind: str, definition_id: str, version: int
    ) -> tuple[DefinitionRow | None, int]:
        """One version (0: the latest) or None, and the id's latest version (0: no such id)."""
        async with outage_is_unavailable("definition read"), self._engine.connect() as conn:
            latest = await self._latest(conn, tenant, kind, definition_id)
            if latest is None or version in (0, latest.version):
                return latest, 0 if latest is None else latest.version
            statement = text(
                f"SELECT {_COLUMNS} FROM definitions WHERE tenant = :tenant AND kind = :kind"  # noqa: S608 (fixed terms)
                " AND definition_id = :id AND version = :version"
            )
            arguments = {"tenant": tenant, "kind": kind, "id": definition_id, "version": version}
            row = (await conn.execute(statement, arguments)).mappings().first()
            return (None if row is None else _row(row)), latest.version

    async def page_latest(
        self, tenant: str, kind: str, *, after: str, limit: int
    ) -> list[DefinitionRow]:
        """The latest version of up to `limit` ids sorting after `after`, by id."""
        statement = text(
            f"SELECT DISTINCT ON (definition_id) {_COLUMNS} FROM definitions"  # noqa: S608 (fixed terms)
            " WHERE tenant = :tenant AND kind = :kind AND definition_id > :after"
            " ORDER BY definition_id, version DESC LIMIT :limit"
        )
        arguments = {"tenant": tenant, "kind": kind, "after": after, "limit": limit}
        async with outage_is_unavailable("definitions list"), self._engine.connect() as conn:
            return [_row(row) for row in (await conn.execute(statement, arguments)).mappings()]

    async def changes(self, *, after: int, limit: int) -> tuple[list[DefinitionChangeRow], int]:
        """Changes with an id above `after`, oldest first, and the newest change id."""
        async with outage_is_unavailable("definition changes read"), self._engine.connect() as conn:
            head = (
                await conn.execute(
                    text("SELECT coalesce(max(change_id), 0) FROM definition_changes")
                )
            ).scalar_one()
            if after >= head:
                return [], int(head)
            result = await conn.execute(
                text(
                    "SELECT change_id, tenant, kind, definition_id, version FROM definition_changes"
                    " WHERE change_id > :after ORDER BY change_id LIMIT :limit"
                ),
                {"after": after, "limit": limit},
            )
            return [DefinitionChangeRow(**dict(row)) for row in result.mappings()], int(head)
