"""All SQL of the storage service: the `events` table, the one-statement batch insert, and the
filtered keyset queries. SQLAlchemy Core over asyncpg; plain dataclasses in and out.

A database outage raises `Unavailable` (a retryable status), so the processor keeps the batch
pending and retries instead of acknowledging or dead-lettering it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
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
    any_,
    bindparam,
    cast,
    func,
    select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, Insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.types import TypeEngine

from streammesh.mesh.errors import Unavailable

__all__ = ["EventQuery", "EventStore", "NewEvent", "StoredRow", "events", "outage_is_unavailable"]

log = logging.getLogger(__name__)

_metadata = MetaData()

# Mirrors migrations/0001_events.sql. No schema: connections resolve names via their search_path.
events = Table(
    "events",
    _metadata,
    Column("seq", BigInteger, Identity(always=True), nullable=False),
    Column("id", Text, primary_key=True),
    Column("key", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("event_time", DateTime(timezone=True), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("attributes", JSONB, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("ingest_time", DateTime(timezone=True), nullable=False),
    Column("store_time", DateTime(timezone=True), nullable=False),
    Column("producer", Text, nullable=False),
)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One event of a batch to store, already validated."""

    id: str
    key: str
    type: str
    event_time: dt.datetime
    payload: bytes
    content_type: str
    attributes: dict[str, str]
    ingest_time: dt.datetime
    producer: str


@dataclass(frozen=True, slots=True)
class StoredRow:
    """One row of `events` as a query returns it."""

    seq: int
    id: str
    key: str
    type: str
    event_time: dt.datetime
    payload: bytes
    content_type: str
    attributes: dict[str, str]
    partition: int
    ingest_time: dt.datetime
    store_time: dt.datetime
    producer: str


@dataclass(frozen=True, slots=True)
class EventQuery:
    """A validated filter: any of `keys` (all when empty), `type` exactly (all when empty),
    `start_time <= event_time < end_time` (open when None)."""

    keys: tuple[str, ...] = ()
    type: str = ""
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None


# Columns the insert supplies from the arrays, in unnest order. attributes travel as text[] and
# are cast per row to jsonb: asyncpg has no jsonb[] encoder for Python values.
_ARRAY_COLUMNS: tuple[tuple[str, TypeEngine[Any]], ...] = (
    ("id", Text()),
    ("key", Text()),
    ("type", Text()),
    ("event_time", DateTime(timezone=True)),
    ("payload", LargeBinary()),
    ("content_type", Text()),
    ("attributes", Text()),
    ("ingest_time", DateTime(timezone=True)),
    ("producer", Text()),
)


def _build_insert() -> Insert:
    """INSERT ... SELECT ... FROM unnest($1::text[], ...) WITH ORDINALITY ORDER BY ordinality
    ON CONFLICT (id) DO NOTHING: one statement and one round trip per batch, identity values
    handed out in batch order (so seq keeps per-key publish order), re-deliveries skipped."""
    rows = (
        func.unnest(*(bindparam(name, type_=ARRAY(sql_type)) for name, sql_type in _ARRAY_COLUMNS))
        .table_valued(*(name for name, _ in _ARRAY_COLUMNS), with_ordinality="ordinality")
        .render_derived(name="batch")
    )
    source = select(
        rows.c.id,
        rows.c.key,
        rows.c.type,
        rows.c.event_time,
        rows.c.payload,
        rows.c.content_type,
        cast(rows.c.attributes, JSONB),
        bindparam("partition", type_=Integer),
        rows.c.ingest_time,
        rows.c.producer,
    ).order_by(rows.c.ordinality)
    target = [
        "id",
        "key",
        "type",
        "event_time",
        "payload",
        "content_type",
        "attributes",
        "partition",
        "ingest_time",
        "producer",
    ]
    return (
        pg_insert(events)
        .from_select(target, source)
        .on_conflict_do_nothing(index_elements=[events.c.id])
    )


_INSERT_BATCH = _build_insert()
# One encoder for all rows: json.dumps with options builds a new encoder per call.
_json = json.JSONEncoder(separators=(",", ":")).encode

# Outages, not bad requests: connection (08), auth (28), missing database (3D), resources (53),
# operator intervention such as shutdown (57), and serialization/deadlock aborts (40).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "28", "3D", "53", "57", "40"})


def _is_outage(error: BaseException) -> bool:
    if isinstance(error, OSError | sa_exc.TimeoutError):  # refused, DNS, timeouts, pool exhausted
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        sqlstate = getattr(error.orig, "sqlstate", None)
        return isinstance(sqlstate, str) and sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return False


@asynccontextmanager
async def outage_is_unavailable(operation: str) -> AsyncIterator[None]:
    try:
        yield
    except Exception as error:
        if not _is_outage(error):
            raise
        log.warning("database unavailable during %s: %s", operation, error)
        raise Unavailable("the event store database is unavailable; retry later") from error


def _conditions(query: EventQuery) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if query.keys:
        # One array parameter, not an expanding IN list: one statement text for any key count.
        where.append(events.c.key == any_(bindparam("keys", list(query.keys), ARRAY(Text))))
    if query.type:
        where.append(events.c.type == query.type)
    if query.start_time is not None:
        where.append(events.c.event_time >= query.start_time)
    if query.end_time is not None:
        where.append(events.c.event_time < query.end_time)
    return where


class EventStore:
    """The `events` table of one schema (the engine's search_path)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def insert_batch(self, batch: Sequence[NewEvent], *, partition: int) -> int:
        """Store the batch in one transaction; return how many were new (the rest were already
        stored under the same id, including repeats inside the batch)."""
        if not batch:
            return 0
        params: dict[str, Any] = {
            "id": [e.id for e in batch],
            "key": [e.key for e in batch],
            "type": [e.type for e in batch],
            "event_time": [e.event_time for e in batch],
            "payload": [e.payload for e in batch],
            "content_type": [e.content_type for e in batch],
            "attributes": [_json(e.attributes) if e.attributes else "{}" for e in batch],
            "ingest_time": [e.ingest_time for e in batch],
            "producer": [e.producer for e in batch],
            "partition": partition,
        }
        async with outage_is_unavailable("insert"), self._engine.begin() as conn:
            result = await conn.execute(_INSERT_BATCH, params)
        return int(result.rowcount)

    async def query(self, query: EventQuery, *, after_seq: int, limit: int) -> list[StoredRow]:
        """Up to `limit` matching rows with seq > `after_seq`, in seq order."""
        statement = (
            select(events)
            .where(*_conditions(query), events.c.seq > after_seq)
            .order_by(events.c.seq)
            .limit(limit)
        )
        async with outage_is_unavailable("query"), self._engine.connect() as conn:
            result = await conn.execute(statement)
            return [StoredRow(**row._mapping) for row in result]

    async def count(self, query: EventQuery) -> int:
        """How many rows match."""
        statement = select(func.count()).select_from(events).where(*_conditions(query))
        async with outage_is_unavailable("count"), self._engine.connect() as conn:
            return int((await conn.execute(statement)).scalar_one())
