"""Revocations of access tokens before they expire, and the feed gateways follow.

A revocation is a row of `revocations`, written by `record()` in the same transaction as the
change it announces (a logout, a reused refresh token, a disabled user, a role change, ...), so
no change commits without its revocation and no revocation exists without its change. Writers
take one advisory lock (per schema) just before the insert and hold it until they commit, so
ids become visible in commit order: a reader that remembers the last id it saw ("the cursor")
misses nothing by asking for larger ids.

`RevocationFeed.watch` serves WatchRevocations: it resumes after the cursor when the cursor's
row still exists, and otherwise sends a snapshot, every row younger than the retention. Rows
older than that (access-token TTL plus a margin) only concern tokens that expired, so the
maintenance task deletes them and a snapshot never misses one that matters.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Interval, Select, delete, func, literal, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.auth.tables import revocations
from streammesh.api.auth.v1 import auth_pb2
from streammesh.mesh.errors import Unavailable
from streammesh.mesh.tasks import raise_if_cancelled

__all__ = ["MAX_BATCH", "Kind", "RevocationFeed", "RevocationRow", "RevocationStore", "record"]

log = logging.getLogger(__name__)

MAX_BATCH = 5000
"""Revocations per response (about 100 bytes each, far below the message limit)."""
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_CURSOR = re.compile(r"([0-9]{1,19})-([0-9]{1,19})")


class Kind(enum.StrEnum):
    """Which tokens a revocation refuses (the column value)."""

    SESSION = "session"
    USER_TOKENS = "user_tokens"
    TENANT_TOKENS = "tenant_tokens"


_KIND_MESSAGE = {
    Kind.SESSION: auth_pb2.REVOCATION_KIND_SESSION,
    Kind.USER_TOKENS: auth_pb2.REVOCATION_KIND_USER_TOKENS,
    Kind.TENANT_TOKENS: auth_pb2.REVOCATION_KIND_TENANT_TOKENS,
}


async def record(conn: AsyncConnection, kind: Kind, subject: str, *, generation: int = 0) -> None:
    """Add a revocation to the transaction of `conn`; call it as the transaction's last write.

    The lock is taken last so that a writer holding it only inserts and commits: it never waits
    for a row lock while others wait for it.
    """
    await conn.execute(
        text("SELECT pg_advisory_xact_lock(hashtext('revocations:' || current_schema()))")
    )
    await conn.execute(
        insert(revocations).values(kind=kind.value, subject=subject, generation=generation)
    )


@dataclass(frozen=True)
class RevocationRow:
    """One revocation as stored."""

    id: int
    kind: Kind
    subject: str
    generation: int
    created_at: dt.datetime

    @property
    def cursor(self) -> str:
        """Names this row: its id and creation time (microseconds), so a cursor from a recreated
        table whose ids started again never resumes at the wrong place."""
        return f"{self.id}-{(self.created_at - _EPOCH) // dt.timedelta(microseconds=1)}"


def parse_cursor(cursor: str) -> tuple[int, dt.datetime] | None:
    """The id and time a cursor names, or None when it is not one of ours."""
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        return None
    try:
        created = _EPOCH + dt.timedelta(microseconds=int(match.group(2)))
    except OverflowError:
        return None
    return int(match.group(1)), created


class RevocationStore:
    """Reads and trims the revocations table."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def recent(self, retention_seconds: float) -> list[RevocationRow]:
        """Every revocation younger than `retention_seconds`, oldest first (a snapshot)."""
        cutoff = func.clock_timestamp() - literal(
            dt.timedelta(seconds=retention_seconds), Interval()
        )
        statement = select(revocations).where(revocations.c.created_at > cutoff)
        return await self._rows(statement.order_by(revocations.c.id))

    async def after(self, last_id: int, *, limit: int = MAX_BATCH) -> list[RevocationRow]:
        """Up to `limit` revocations committed after the one with id `last_id`, oldest first."""
        statement = select(revocations).where(revocations.c.id > last_id)
        return await self._rows(statement.order_by(revocations.c.id).limit(limit))

    async def newest(self) -> RevocationRow | None:
        """The revocation committed last, however old."""
        rows = await self._rows(select(revocations).order_by(revocations.c.id.desc()).limit(1))
        return rows[0] if rows else None

    async def exists(self, row_id: int, created_at: dt.datetime) -> bool:
        """Whether the row a cursor names is still stored (so nothing after it was trimmed)."""
        statement = select(revocations.c.id).where(
            revocations.c.id == row_id, revocations.c.created_at == created_at
        )
        async with self._engine.connect() as conn:
            return (await conn.execute(statement)).first() is not None

    async def trim(self, retention_seconds: float) -> int:
        """Delete revocations older than `retention_seconds`; returns how many."""
        cutoff = func.clock_timestamp() - literal(
            dt.timedelta(seconds=retention_seconds), Interval()
        )
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(revocations).where(revocations.c.created_at < cutoff)
            )
        return int(result.rowcount)

    async def _rows(self, statement: Select[Any]) -> list[RevocationRow]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(statement)).all()
        return [
            RevocationRow(row.id, Kind(row.kind), row.subject, row.generation, row.created_at)
            for row in rows
        ]


class RevocationFeed:
    """WatchRevocations for one replica: polls the table for every open stream.

    Polling (an index range scan that finds nothing almost always) keeps the table the only
    source of truth, so every auth replica serves the same feed and a feed cannot run ahead of
    or behind the commits it announces.
    """

    def __init__(
        self,
        store: RevocationStore,
        *,
        retention_seconds: float,
        poll_seconds: float,
        heartbeat_seconds: float,
    ) -> None:
        self._store = store
        self._retention = retention_seconds
        self._poll = poll_seconds
        self._heartbeat = heartbeat_seconds

    async def watch(self, cursor: str) -> AsyncIterator[auth_pb2.WatchRevocationsResponse]:
        """The responses of one stream: catch-up or snapshot at once, then new revocations
        within a poll interval, and a heartbeat whenever `heartbeat_seconds` passed without.
        Ends with Unavailable when the database cannot be read (no heartbeat is sent then: a
        heartbeat promises that nothing committed is missing)."""
        try:
            async for response in self._watch(cursor):
                yield response
        except (SQLAlchemyError, OSError) as error:
            log.warning("revocation feed: the database cannot be read (%s)", type(error).__name__)
            raise Unavailable("the revocation store is unavailable") from None

    async def _watch(self, cursor: str) -> AsyncIterator[auth_pb2.WatchRevocationsResponse]:
        loop = asyncio.get_running_loop()
        resume = parse_cursor(cursor)
        if resume is not None and await self._store.exists(*resume):
            rows, snapshot, last_id = await self._store.after(resume[0]), False, resume[0]
        else:
            rows, snapshot, last_id, cursor = await self._store.recent(self._retention), True, 0, ""
            newest = None if rows else await self._store.newest()
            if newest is not None:  # nothing recent: resume after the newest row all the same
                cursor, last_id = newest.cursor, newest.id
        while True:
            for start in range(0, max(len(rows), 1), MAX_BATCH):
                chunk = rows[start : start + MAX_BATCH]
                if chunk:
                    cursor, last_id = chunk[-1].cursor, chunk[-1].id
                yield self._response(chunk, snapshot=snapshot, cursor=cursor)
                snapshot = False
            sent = loop.time()
            while True:
                raise_if_cancelled()
                await asyncio.sleep(self._poll)
                rows = await self._store.after(last_id)
                if rows or loop.time() - sent >= self._heartbeat:
                    break

    def _response(
        self, rows: Sequence[RevocationRow], *, snapshot: bool, cursor: str
    ) -> auth_pb2.WatchRevocationsResponse:
        response = auth_pb2.WatchRevocationsResponse(snapshot=snapshot, cursor=cursor)
        response.heartbeat.FromNanoseconds(int(self._heartbeat * 1e9))
        for row in rows:
            message = response.revocations.add(
                kind=_KIND_MESSAGE[row.kind], subject=row.subject, generation=row.generation
            )
            message.revoke_time.FromDatetime(row.created_at)
            message.expire_time.FromDatetime(row.created_at + dt.timedelta(seconds=self._retention))
        return response
