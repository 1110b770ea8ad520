"""The field scopes of filtered queries (which payload fields a filter may name, from the latest
schema of each type in scope), cached per storage replica and invalidated by the registry's
change log (schema_changes, migration 0005), as ingest's schema cache follows it
(services/ingest/schema_cache.py).

Why not read them per query as before: a scope costs a read-only transaction (BEGIN, settings,
the join of subjects and versions, COMMIT) and a JSON parse of every schema in scope (up to
1,000 for a query naming no types), on every filtered query; schemas change rarely.

Freshness: "a schema registered is seen by the next query", on every replica, with no delay: each
scope lookup first reads the change log's head (`max(change_id)`, the end of its primary key:
one short statement, no transaction). Past the cursor, the changes after it are read and every
tenant they name is dropped from the cache, then the cursor moves to the head. Registry writers
lock schema_changes until they commit, so change ids become visible in id order (migration
0005) and reading after the cursor misses none; a registration's change commits with its
version, so a query that starts after the registration returned sees a head at or past it.
A load that began before an invalidation is not kept (an epoch, as in ingest's cache): its
snapshot may predate the change. When the log's head went backwards (the log was reset) or
too many changes came at once, everything is dropped. Outages: the head read fails like any
query (UNAVAILABLE); nothing stale is served.

Why not polling in the background, as ingest does: a poll interval is a window in which a
query on another replica does not see a schema just registered; the head read costs one
index probe per query, measured in scripts/bench_query_scope.py.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence

import asyncpg

from services.storage.filters import FieldScope, payload_fields
from services.storage.store import outage_is_unavailable

__all__ = ["MAX_SCHEMAS", "SCOPE_SQL", "SchemaScopes"]

MAX_SCHEMAS = 1000
"""Schemas loaded into one query's scope, at most (a tenant's types, the newest first)."""
_HEAD = "SELECT coalesce(max(change_id), 0) FROM schema_changes"
_CHANGED_TENANTS = (
    "SELECT DISTINCT tenant FROM"
    " (SELECT tenant FROM schema_changes WHERE change_id > $1 AND change_id <= $2"
    "  ORDER BY change_id LIMIT $3) AS changed"
)
SCOPE_SQL = (
    "SELECT s.event_type, v.schema_text FROM schema_subjects s"
    " JOIN schema_versions v ON v.tenant = s.tenant AND v.event_type = s.event_type"
    " AND v.version = s.latest_version"
    " WHERE s.tenant = $1 AND ($2::text[] IS NULL OR s.event_type = ANY($2::text[]))"
    " ORDER BY s.updated_at DESC LIMIT $3"
)
_MAX_CHANGES = 1000
"""Changes applied one by one; past this many since the cursor, the whole cache is dropped."""


class SchemaScopes:
    """FieldScopes by (tenant, types), fresh as of the registry's change log at each lookup."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        acquire_timeout: float = 5.0,
        max_tenants: int = 1000,
        max_scopes_per_tenant: int = 256,
    ) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        self._max_tenants = max_tenants
        self._max_scopes = max_scopes_per_tenant
        self._scopes: OrderedDict[str, OrderedDict[tuple[str, ...], FieldScope]] = OrderedDict()
        self._cursor: int | None = None
        self._epoch = 0
        """Bumped at every invalidation: a load that began before one is not kept."""
        self.loads = 0
        """Scopes read from the registry's tables (misses), for tests and the benchmark."""

    async def scope(self, tenant: str, types: Sequence[str]) -> FieldScope:
        """The payload fields a filter may name: the latest schema of each of `types` (of every
        type of the tenant when empty). Undeclared fields are allowed, typed by their literal,
        when some type in scope may lack a schema: a named type without one, or no types named
        (a tenant's events may have types it never registered)."""
        key = tuple(sorted(set(types)))
        async with (
            outage_is_unavailable("query"),
            self._pool.acquire(timeout=self._acquire_timeout) as conn,
        ):
            await self._follow(conn)
            cached = self._scopes.get(tenant)
            if cached is not None and key in cached:
                self._scopes.move_to_end(tenant)
                cached.move_to_end(key)
                return cached[key]
            epoch = self._epoch
            rows = await conn.fetch(SCOPE_SQL, tenant, list(key) or None, MAX_SCHEMAS)
        self.loads += 1
        schemas = {row[0]: payload_fields(json.loads(row[1])) for row in rows}
        undeclared = not key or any(name not in schemas for name in key)
        scope = FieldScope(schemas, allow_undeclared=undeclared)
        if epoch == self._epoch:
            self._keep(tenant, key, scope)
        return scope

    async def _follow(self, conn: asyncpg.Connection) -> None:
        """Drop what the changes since the cursor touch, and move the cursor to the head."""
        head = int(await conn.fetchval(_HEAD))
        cursor = self._cursor
        if cursor is not None and head == cursor:
            return
        if cursor is None or head < cursor or head - cursor > _MAX_CHANGES:
            # First contact, the log was reset, or too much changed (ids may have gaps: a
            # rolled-back registration's; this only drops more than needed).
            self._drop_all()
        else:
            tenants = await conn.fetch(_CHANGED_TENANTS, cursor, head, _MAX_CHANGES)
            self._epoch += 1
            for row in tenants:
                self._scopes.pop(row[0], None)
        # Concurrent lookups may follow at once; the cursor only moves forward.
        self._cursor = head if self._cursor is None else max(self._cursor, head)

    def _drop_all(self) -> None:
        self._epoch += 1
        self._scopes.clear()

    def _keep(self, tenant: str, key: tuple[str, ...], scope: FieldScope) -> None:
        scopes = self._scopes.setdefault(tenant, OrderedDict())
        self._scopes.move_to_end(tenant)
        scopes[key] = scope
        while len(scopes) > self._max_scopes:
            scopes.popitem(last=False)
        while len(self._scopes) > self._max_tenants:
            self._scopes.popitem(last=False)
