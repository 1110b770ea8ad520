"""All SQL of the `dead_letters` table (migrations/0002_dead_letters.sql, 0008 for the tenant
that every read is scoped to): the idempotent record
the processor writes before it acknowledges a poison entry, the newest-first keyset listing, and
the replay mark. SQLAlchemy Core over asyncpg; plain dataclasses in and out.

Raw entry fields (kept when an entry did not decode) are bytes; they are held in jsonb as a list
of `{"name": base64, "value": base64}` so that any byte string survives.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    DateTime,
    Identity,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.store import outage_is_unavailable

__all__ = [
    "DeadLetterBody",
    "DeadLetterQuery",
    "DeadLetterRow",
    "DeadLetterStore",
    "NewDeadLetter",
    "dead_letters",
]

_metadata = MetaData()

# Mirrors migrations/0002_dead_letters.sql and 0008. No schema: connections resolve names via
# search_path.
dead_letters = Table(
    "dead_letters",
    _metadata,
    Column("tenant", Text, primary_key=True),
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("stream", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("entry_id", Text, nullable=False),
    Column("event_ids", ARRAY(Text), nullable=False),
    Column("batch", LargeBinary, nullable=True),
    Column("raw_fields", JSONB, nullable=True),
    Column("error", Text, nullable=False),
    Column("delivery_count", Integer, nullable=False),
    Column("first_failed_at", DateTime(timezone=True), nullable=False),
    Column("last_failed_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("replayed_at", DateTime(timezone=True), nullable=True),
    Column("replay_count", Integer, nullable=False),
    Column("replayed_by", Text, nullable=True),
)

RawFields = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class NewDeadLetter:
    """A dead letter to record, already validated."""

    tenant: str
    """The tenant of the entry's events ("default" when unknown)."""
    stream: str
    partition: int
    entry_id: str
    event_ids: tuple[str, ...]
    batch: bytes | None
    raw_fields: RawFields | None
    error: str
    delivery_count: int
    first_failed_at: dt.datetime
    last_failed_at: dt.datetime


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """A dead letter without its body (what a listing shows)."""

    id: int
    stream: str
    partition: int
    entry_id: str
    event_ids: tuple[str, ...]
    error: str
    delivery_count: int
    first_failed_at: dt.datetime
    last_failed_at: dt.datetime
    created_at: dt.datetime
    replayed_at: dt.datetime | None
    replay_count: int
    replayed_by: str
    has_batch: bool


@dataclass(frozen=True, slots=True)
class DeadLetterBody:
    """What a dead letter holds: the serialized batch, or the raw fields of an undecodable entry."""

    batch: bytes | None
    raw_fields: RawFields


@dataclass(frozen=True, slots=True)
class DeadLetterQuery:
    """A listing filter: one tenant's dead letters, of one partition (all when None), replayed
    or not (both when None)."""

    tenant: str
    partition: int | None = None
    replayed: bool | None = None


_SUMMARY = (
    dead_letters.c.id,
    dead_letters.c.stream,
    dead_letters.c.partition,
    dead_letters.c.entry_id,
    dead_letters.c.event_ids,
    dead_letters.c.error,
    dead_letters.c.delivery_count,
    dead_letters.c.first_failed_at,
    dead_letters.c.last_failed_at,
    dead_letters.c.created_at,
    dead_letters.c.replayed_at,
    dead_letters.c.replay_count,
    dead_letters.c.replayed_by,
    dead_letters.c.batch.is_not(None).label("has_batch"),
)


def _row(mapping: Any) -> DeadLetterRow:
    return DeadLetterRow(
        id=mapping["id"],
        stream=mapping["stream"],
        partition=mapping["partition"],
        entry_id=mapping["entry_id"],
        event_ids=tuple(mapping["event_ids"]),
        error=mapping["error"],
        delivery_count=mapping["delivery_count"],
        first_failed_at=mapping["first_failed_at"],
        last_failed_at=mapping["last_failed_at"],
        created_at=mapping["created_at"],
        replayed_at=mapping["replayed_at"],
        replay_count=mapping["replay_count"],
        replayed_by=mapping["replayed_by"] or "",
        has_batch=bool(mapping["has_batch"]),
    )


def _encode_raw(fields: RawFields | None) -> list[dict[str, str]] | None:
    if fields is None:
        return None
    return [
        {"name": base64.b64encode(name).decode(), "value": base64.b64encode(value).decode()}
        for name, value in fields
    ]


def _decode_raw(stored: Any) -> RawFields:
    if not isinstance(stored, list):
        return ()
    return tuple(
        (base64.b64decode(item["name"]), base64.b64decode(item["value"])) for item in stored
    )


def _conditions(query: DeadLetterQuery) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [dead_letters.c.tenant == query.tenant]
    if query.partition is not None:
        where.append(dead_letters.c.partition == query.partition)
    if query.replayed is True:
        where.append(dead_letters.c.replayed_at.is_not(None))
    elif query.replayed is False:
        where.append(dead_letters.c.replayed_at.is_(None))
    return where


class DeadLetterStore:
    """The `dead_letters` table of one schema (the engine's search_path)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def insert(self, new: NewDeadLetter) -> tuple[DeadLetterRow, bool]:
        """Record `new` unless its (stream, entry_id) is recorded already; returns the stored
        row and whether this call created it. A repeat changes nothing (first record wins)."""
        statement = (
            pg_insert(dead_letters)
            .values(
                tenant=new.tenant,
                stream=new.stream,
                partition=new.partition,
                entry_id=new.entry_id,
                event_ids=list(new.event_ids),
                batch=new.batch,
                raw_fields=_encode_raw(new.raw_fields),
                error=new.error,
                delivery_count=new.delivery_count,
                first_failed_at=new.first_failed_at,
                last_failed_at=new.last_failed_at,
                created_at=func.now(),
                replay_count=0,
            )
            .on_conflict_do_nothing(constraint="dead_letters_entry_key")
            .returning(*_SUMMARY)
        )
        existing = select(*_SUMMARY).where(
            dead_letters.c.stream == new.stream, dead_letters.c.entry_id == new.entry_id
        )
        async with outage_is_unavailable("dead letter insert"), self._engine.begin() as conn:
            created = (await conn.execute(statement)).mappings().first()
            if created is not None:
                return _row(created), True
            # Read committed: this statement sees the row the conflicting insert committed.
            return _row((await conn.execute(existing)).mappings().one()), False

    async def page(
        self, query: DeadLetterQuery, *, before_id: int | None, limit: int
    ) -> Sequence[DeadLetterRow]:
        """Up to `limit` matching rows with id < `before_id` (all when None), newest first."""
        where = _conditions(query)
        if before_id is not None:
            where.append(dead_letters.c.id < before_id)
        statement = select(*_SUMMARY).where(*where).order_by(dead_letters.c.id.desc()).limit(limit)
        async with outage_is_unavailable("dead letter list"), self._engine.connect() as conn:
            return [_row(row) for row in (await conn.execute(statement)).mappings()]

    async def get(
        self, tenant: str, dead_letter_id: int
    ) -> tuple[DeadLetterRow, DeadLetterBody] | None:
        """One dead letter of `tenant` with its body, or None (also for another tenant's)."""
        statement = select(*_SUMMARY, dead_letters.c.batch, dead_letters.c.raw_fields).where(
            dead_letters.c.tenant == tenant, dead_letters.c.id == dead_letter_id
        )
        async with outage_is_unavailable("dead letter get"), self._engine.connect() as conn:
            found = (await conn.execute(statement)).mappings().first()
        if found is None:
            return None
        return _row(found), DeadLetterBody(found["batch"], _decode_raw(found["raw_fields"]))

    async def mark_replayed(
        self, tenant: str, dead_letter_id: int, *, by: str
    ) -> DeadLetterRow | None:
        """Count one more replay, by `by`, now; None when `tenant` has no such dead letter."""
        statement = (
            update(dead_letters)
            .where(dead_letters.c.tenant == tenant, dead_letters.c.id == dead_letter_id)
            .values(
                replayed_at=func.now(),
                replay_count=dead_letters.c.replay_count + 1,
                replayed_by=by,
            )
            .returning(*_SUMMARY)
        )
        async with outage_is_unavailable("dead letter mark"), self._engine.begin() as conn:
            found = (await conn.execute(statement)).mappings().first()
        return None if found is None else _row(found)
