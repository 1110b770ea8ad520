"""All SQL of the schema registry (migrations/0005_schema_registry.sql): subjects, versions, the
per-tenant unknown-type policy and the change log ingest follows. Every statement names one
tenant (except the change log, read across tenants by ingest), so it keeps to one shard once the
tables are distributed by tenant.

Registration serializes per subject on the subject's row (`SELECT ... FOR UPDATE`): two
concurrent registrations of one type are checked one after the other, each against the versions
the other committed, so a version is never checked against a stale history.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.storage.store import outage_is_unavailable

__all__ = [
    "DEFAULT_UNKNOWN_TYPES",
    "ChangeRow",
    "RegistryStore",
    "SubjectRow",
    "VersionRow",
]

DEFAULT_UNKNOWN_TYPES = "ACCEPT"
"""The unknown-type policy of a tenant that never set one."""


@dataclass(frozen=True, slots=True)
class SubjectRow:
    event_type: str
    compatibility: str
    latest_version: int
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class VersionRow:
    event_type: str
    version: int
    schema_text: str
    """Empty in listings."""
    fingerprint: str
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class ChangeRow:
    change_id: int
    tenant: str
    event_type: str


def _subject(row: Any) -> SubjectRow:
    return SubjectRow(**dict(row))


def _version(row: Any) -> VersionRow:
    return VersionRow(**dict(row))


async def _record_change(conn: AsyncConnection, tenant: str, event_type: str) -> None:
    # The lock makes change ids visible in id order (see the migration); it is held to commit.
    await conn.execute(text("LOCK TABLE schema_changes IN EXCLUSIVE MODE"))
    await conn.execute(
        text("INSERT INTO schema_changes (tenant, event_type) VALUES (:tenant, :type)"),
        {"tenant": tenant, "type": event_type},
    )


Decide = Callable[[str, Sequence[VersionRow]], Awaitable[None]]
"""Called with the subject's mode and its versions (oldest first) before a new version is
written, and awaited; raises to refuse it."""


class RegistryStore:
    """The registry tables of one schema (the engine's search_path)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def subject(self, tenant: str, event_type: str) -> SubjectRow | None:
        statement = text(
            "SELECT event_type, compatibility, latest_version, created_at, updated_at FROM schema_subjects"
            " WHERE tenant = :tenant AND event_type = :type"
        )
        async with outage_is_unavailable("schema subject read"), self._engine.connect() as conn:
            row = (
                (await conn.execute(statement, {"tenant": tenant, "type": event_type}))
                .mappings()
                .first()
            )
        return None if row is None else _subject(row)

    async def versions(self, tenant: str, event_type: str) -> list[VersionRow]:
        """Every version of the subject with its document, oldest first."""
        async with outage_is_unavailable("schema versions read"), self._engine.connect() as conn:
            return await self._versions(conn, tenant, event_type)

    @staticmethod
    async def _versions(conn: AsyncConnection, tenant: str, event_type: str) -> list[VersionRow]:
        statement = text(
            "SELECT event_type, version, schema_text, fingerprint, created_at FROM schema_versions"
            " WHERE tenant = :tenant AND event_type = :type ORDER BY version"
        )
        result = await conn.execute(statement, {"tenant": tenant, "type": event_type})
        return [_version(row) for row in result.mappings()]

    async def version(self, tenant: str, event_type: str, version: int) -> VersionRow | None:
        """One version; `version` 0 is the latest. None when there is no such version."""
        # Version 0 is the subject's latest.
        statement = text(
            "SELECT event_type, version, schema_text, fingerprint, created_at FROM schema_versions"
            " WHERE tenant = :tenant AND event_type = :type AND version = CASE WHEN :version = 0"
            " THEN (SELECT latest_version FROM schema_subjects"
            " WHERE tenant = :tenant AND event_type = :type) ELSE :version END"
        )
        arguments = {"tenant": tenant, "type": event_type, "version": version}
        async with outage_is_unavailable("schema read"), self._engine.connect() as conn:
            row = (await conn.execute(statement, arguments)).mappings().first()
        return None if row is None else _version(row)

    async def register(
        self,
        tenant: str,
        event_type: str,
        *,
        schema_text: str,
        fingerprint: str,
        decide: Decide,
    ) -> tuple[VersionRow, bool, str]:
        """The version holding `fingerprint` (created False), or a new one written after
        `decide` let it pass (created True); with the subject's mode."""
        async with outage_is_unavailable("schema register"), self._engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO schema_subjects (tenant, event_type) VALUES (:tenant, :type)"
                    " ON CONFLICT DO NOTHING"
                ),
                {"tenant": tenant, "type": event_type},
            )
            subject = _subject(
                (
                    await conn.execute(
                        text(
                            "SELECT event_type, compatibility, latest_version, created_at, updated_at FROM schema_subjects"
                            " WHERE tenant = :tenant AND event_type = :type FOR UPDATE"
                        ),
                        {"tenant": tenant, "type": event_type},
                    )
                )
                .mappings()
                .one()
            )
            previous = await self._versions(conn, tenant, event_type)
            for existing in previous:
                if existing.fingerprint == fingerprint:
                    return existing, False, subject.compatibility
            await decide(subject.compatibility, previous)
            number = subject.latest_version + 1
            created = (
                (
                    await conn.execute(
                        text(
                            "INSERT INTO schema_versions"
                            " (tenant, event_type, version, schema_text, fingerprint)"
                            " VALUES (:tenant, :type, :version, :schema_text, :fingerprint)"
                            " RETURNING event_type, version, schema_text, fingerprint, created_at"
                        ),
                        {
                            "tenant": tenant,
                            "type": event_type,
                            "version": number,
                            "schema_text": schema_text,
                            "fingerprint": fingerprint,
                        },
                    )
                )
                .mappings()
                .one()
            )
            await conn.execute(
                text(
                    "UPDATE schema_subjects SET latest_version = :version, updated_at = now()"
                    " WHERE tenant = :tenant AND event_type = :type"
                ),
                {"tenant": tenant, "type": event_type, "version": number},
            )
            await _record_change(conn, tenant, event_type)
            return _version(created), True, subject.compatibility

    async def set_compatibility(self, tenant: str, event_type: str, mode: str) -> SubjectRow:
        statement = text(
            "INSERT INTO schema_subjects (tenant, event_type, compatibility)"
            " VALUES (:tenant, :type, :mode) ON CONFLICT (tenant, event_type) DO UPDATE"
            " SET compatibility = EXCLUDED.compatibility, updated_at = now()"
            " RETURNING event_type, compatibility, latest_version, created_at, updated_at"
        )
        async with outage_is_unavailable("schema mode"), self._engine.begin() as conn:
            arguments = {"tenant": tenant, "type": event_type, "mode": mode}
            row = (await conn.execute(statement, arguments)).mappings().one()
            await _record_change(conn, tenant, event_type)
        return _subject(row)

    async def page_subjects(self, tenant: str, *, after: str, limit: int) -> list[SubjectRow]:
        """Up to `limit` subjects whose type sorts after `after` ("" for the first page)."""
        statement = text(
            "SELECT event_type, compatibility, latest_version, created_at, updated_at FROM schema_subjects"
            " WHERE tenant = :tenant AND event_type > :after ORDER BY event_type LIMIT :limit"
        )
        arguments = {"tenant": tenant, "after": after, "limit": limit}
        async with outage_is_unavailable("schema subjects list"), self._engine.connect() as conn:
            return [_subject(row) for row in (await conn.execute(statement, arguments)).mappings()]

    async def page_versions(
        self, tenant: str, event_type: str, *, after: int, limit: int
    ) -> list[VersionRow]:
        """Up to `limit` versions above `after`, oldest first, without their documents."""
        statement = text(
            "SELECT event_type, version, '' AS schema_text, fingerprint, created_at"
            " FROM schema_versions WHERE tenant = :tenant AND event_type = :type"
            " AND version > :after ORDER BY version LIMIT :limit"
        )
        arguments = {"tenant": tenant, "type": event_type, "after": after, "limit": limit}
        async with outage_is_unavailable("schema versions list"), self._engine.connect() as conn:
            return [_version(row) for row in (await conn.execute(statement, arguments)).mappings()]

    async def policy(self, tenant: str) -> str:
        statement = text("SELECT unknown_types FROM schema_policies WHERE tenant = :tenant")
        async with outage_is_unavailable("schema policy read"), self._engine.connect() as conn:
            found = (await conn.execute(statement, {"tenant": tenant})).scalar_one_or_none()
        return str(found) if found is not None else DEFAULT_UNKNOWN_TYPES

    async def set_policy(self, tenant: str, unknown_types: str) -> str:
        statement = text(
            "INSERT INTO schema_policies (tenant, unknown_types) VALUES (:tenant, :policy)"
            " ON CONFLICT (tenant) DO UPDATE"
            " SET unknown_types = EXCLUDED.unknown_types, updated_at = now()"
        )
        async with outage_is_unavailable("schema policy write"), self._engine.begin() as conn:
            await conn.execute(statement, {"tenant": tenant, "policy": unknown_types})
            await _record_change(conn, tenant, "")
        return unknown_types

    async def changes(self, *, after: int, limit: int) -> tuple[list[ChangeRow], int]:
        """Changes with an id above `after`, oldest first, and the newest change id."""
        async with outage_is_unavailable("schema changes read"), self._engine.connect() as conn:
            head = (
                await conn.execute(text("SELECT coalesce(max(change_id), 0) FROM schema_changes"))
            ).scalar_one()
            if after >= head:
                return [], int(head)
            result = await conn.execute(
                text(
                    "SELECT change_id, tenant, event_type FROM schema_changes"
                    " WHERE change_id > :after ORDER BY change_id LIMIT :limit"
                ),
                {"after": after, "limit": limit},
            )
            return [ChangeRow(**dict(row)) for row in result.mappings()], int(head)
