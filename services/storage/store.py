"""All SQL of the storage service: the `events` table, the one-statement batch insert, and the
filtered keyset queries. SQLAlchemy Core over asyncpg (the insert straight on asyncpg); plain
dataclasses in and out.

A database outage raises `Unavailable` (a retryable status), so the processor keeps the batch
pending and retries instead of acknowledging or dead-lettering it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
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
    func,
    select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncEngine

from streammesh.mesh.errors import Unavailable

__all__ = [
    "INSERT_BATCH",
    "BatchColumns",
    "EventQuery",
    "EventStore",
    "StoredRow",
    "events",
    "outage_is_unavailable",
]

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


@dataclass(slots=True)
class BatchColumns:
    """A validated batch as the insert takes it: one list per column, in batch order."""

    ids: list[str]
    keys: list[str]
    types: list[str]
    event_times: list[dt.datetime]
    payloads: list[bytes]
    content_types: list[str]
    attributes: list[str]
    """JSON objects, as text."""
    ingest_times: list[dt.datetime]
    producers: list[str]

    @classmethod
    def empty(cls) -> BatchColumns:
        return cls([], [], [], [], [], [], [], [], [])

    def append(
        self,
        *,
        id: str,
        key: str,
        type: str,
        event_time: dt.datetime,
        payload: bytes,
        content_type: str,
        attributes: str,
        ingest_time: dt.datetime,
        producer: str,
    ) -> None:
        self.ids.append(id)
        self.keys.append(key)
        self.types.append(type)
        self.event_times.append(event_time)
        self.payloads.append(payload)
        self.content_types.append(content_type)
        self.attributes.append(attributes)
        self.ingest_times.append(ingest_time)
        self.producers.append(producer)

    def __len__(self) -> int:
        return len(self.ids)


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


# One statement and one round trip per batch, with no BEGIN/COMMIT around it (a single statement
# is its own transaction): identity values are handed out in batch order (ORDER BY ordinality),
# so seq keeps per-key publish order, and re-deliveries are skipped. attributes travel as text[]
# and are cast per row: asyncpg has no jsonb[] encoder for Python values. Plain asyncpg rather
# than SQLAlchemy here, because this statement carries every event (SQLAlchemy's bind
# processing alone cost ~1 us per event).
INSERT_BATCH = """
INSERT INTO events (id, key, type, event_time, payload, content_type, attributes, partition,
                    ingest_time, producer)
SELECT b.id, b.key, b.type, b.event_time, b.payload, b.content_type, b.attributes::jsonb, $10,
       b.ingest_time, b.producer
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bytea[], $6::text[],
            $7::text[], $8::timestamptz[], $9::text[])
     WITH ORDINALITY AS b(id, key, type, event_time, payload, content_type, attributes,
                          ingest_time, producer, ordinality)
ORDER BY b.ordinality
ON CONFLICT (id) DO NOTHING
"""

# Outages, not bad requests: connection (08), auth (28), missing database (3D), resources (53),
# operator intervention such as shutdown (57), and serialization/deadlock aborts (40).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "28", "3D", "53", "57", "40"})


def _is_outage(error: BaseException) -> bool:
    # refused, DNS, timeouts, pool exhausted, a connection closed under us
    if isinstance(error, OSError | TimeoutError | sa_exc.TimeoutError | asyncpg.InterfaceError):
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        error = error.orig or error
    sqlstate = getattr(error, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES


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
    """The `events` table of one schema (the search_path of the engine and of the pool, which
    takes the batch inserts)."""

    def __init__(
        self, engine: AsyncEngine, pool: asyncpg.Pool, *, acquire_timeout: float = 5.0
    ) -> None:
        self._engine = engine
        self._pool = pool
        self._acquire_timeout = acquire_timeout

    async def insert_batch(self, batch: BatchColumns, *, partition: int) -> int:
        """Store the batch atomically; return how many were new (the rest were already stored
        under the same id, including repeats inside the batch)."""
        if not batch:
            return 0
        async with (
            outage_is_unavailable("insert"),
            self._pool.acquire(timeout=self._acquire_timeout) as conn,
        ):
            status = await conn.execute(
                INSERT_BATCH,
                batch.ids,
                batch.keys,
                batch.types,
                batch.event_times,
                batch.payloads,
                batch.content_types,
                batch.attributes,
                batch.ingest_times,
                batch.producers,
                partition,
            )
        return int(status.rsplit(" ", 1)[1])  # "INSERT 0 <rows>"

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
