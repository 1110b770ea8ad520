"""The event store's writes: the one-statement batch insert (and its conflict record), and the
row type the queries return (their SQL is services.storage.queries), straight on asyncpg (every
event of a batch passes through here; SQLAlchemy's bind and result processing alone cost about
1 us per event). Plain dataclasses
in and out; timestamps travel as Postgres microsecond counts (services.storage.times).

A database outage raises `Unavailable` (a retryable status), so the processor keeps the batch
pending and retries instead of acknowledging or dead-lettering it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import exc as sa_exc

from services.storage.event_fences import Fence, fence_arguments, stale
from services.storage.sql import (
    FENCED_INSERTS,
    INSERT_BATCH,
    INSERT_BATCH_JOINED,
    INSERT_PARTITIONS,
    INSERT_PARTITIONS_JOINED,
    RECORD_CONFLICTS,
    RECORD_CONFLICTS_JOINED,
    TEXT_SEPARATOR,
    texts_joinable,
)
from services.storage.times import TimeBound
from streammesh.mesh.errors import Unavailable

__all__ = [
    "BatchColumns",
    "EventStore",
    "StoredRow",
    "outage_is_unavailable",
]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchColumns:
    """A validated batch as the insert takes it: one list per column, in batch order."""

    ids: list[str]
    keys: list[str]
    types: list[str]
    event_times: list[int]
    """Postgres microsecond counts (services.storage.times)."""
    event_time_nanos: list[int]
    """The nanoseconds below each event time's microsecond, 0..999."""
    payloads: list[bytes]
    content_types: list[str]
    attributes: list[str]
    """JSON objects, as text."""
    ingest_times: list[int]
    """Postgres microsecond counts."""
    producers: list[str]
    tenants: list[str]
    """The tenant of each event (with the id, the idempotency key)."""

    @classmethod
    def empty(cls) -> BatchColumns:
        return cls([], [], [], [], [], [], [], [], [], [], [])

    def append(
        self,
        *,
        id: str,
        key: str,
        type: str,
        event_time: TimeBound,
        payload: bytes,
        content_type: str,
        attributes: str,
        ingest_time: int,
        producer: str,
        tenant: str,
    ) -> None:
        self.ids.append(id)
        self.keys.append(key)
        self.types.append(type)
        self.event_times.append(event_time[0])
        self.event_time_nanos.append(event_time[1])
        self.payloads.append(payload)
        self.content_types.append(content_type)
        self.attributes.append(attributes)
        self.ingest_times.append(ingest_time)
        self.producers.append(producer)
        self.tenants.append(tenant)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class StoredRow:
    """One row of `events` as a query returns it; times as Postgres microsecond counts, which
    may lie outside the Timestamp range in a row written by hand (infinity is +-2**63)."""

    seq: int
    id: str
    key: str
    type: str
    event_time: int
    event_time_nanos: int
    payload: bytes
    content_type: str
    attributes: str
    """The JSON text of the jsonb column."""
    partition: int
    ingest_time: int
    store_time: int
    producer: str


# Outages, not bad requests: connection (08), auth (28), missing database (3D), resources (53),
# operator intervention such as shutdown (57), and serialization/deadlock aborts (40).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "28", "3D", "53", "57", "40"})


def _is_outage(error: BaseException) -> bool:
    # refused, DNS, timeouts, pool exhausted, a connection closed under us
    if isinstance(error, asyncpg.DataError):
        return False  # a value asyncpg could not encode: deterministic, not an outage
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


def _log_conflicts(batch: BatchColumns, recorded: int) -> None:
    """One line per batch that held conflicts: how many, and of which tenants (no contents)."""
    if recorded:
        log.warning(
            "%d event(s) of a batch of %d reuse a stored (tenant, id) with other content; the "
            "stored events are kept and the others recorded in event_conflicts (tenants: %s)",
            recorded,
            len(batch),
            ", ".join(sorted(set(batch.tenants))[:5]),
        )


_RACES = 5
"""Runs of an insert that lost a race for a new (tenant, id) before the error is raised."""


async def _insert_once_stored(conn: asyncpg.Connection, statement: str, *args: object) -> str:
    """Run the insert; when a concurrent statement stored one of the batch's new ids first (the
    insert fails as a whole on event_ids' key: services/storage/sql.py says why), run it again:
    the committed ids are then skipped. Each run is its own transaction, and a race needs the
    same new id in two batches at the same moment, so a second run is rare and a third rarer.
    A fenced insert refused for a stale epoch raises FailedPrecondition."""
    for attempt in range(1, _RACES + 1):
        try:
            return str(await conn.execute(statement, *args))
        except asyncpg.UniqueViolationError as error:
            if error.constraint_name != "event_ids_pkey" or attempt == _RACES:
                raise
            log.info("an insert met a concurrent one storing the same id; run again")
        except asyncpg.PostgresError as error:
            refused = stale(error)
            if refused is None:
                raise
            raise refused from None
    raise AssertionError("unreachable")


class EventStore:
    """The `events` table of one schema: the search_path of the pool, whose connections
    exchange timestamps as integers (`use_integer_timestamps` as its init)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        acquire_timeout: float = 5.0,
        committed: Callable[[Iterable[str]], None] | None = None,
    ) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        self._committed = committed
        """Told the tenants of each batch that stored rows, after its commit (live feeds)."""

    async def insert_batch(
        self, batch: BatchColumns, *, partition: int, fences: Sequence[Fence] = ()
    ) -> int:
        """Store the batch atomically; return how many were new (the rest were already stored
        under the same tenant and id, including repeats inside the batch). Of those, the ones
        whose content differs from the stored event are recorded in `event_conflicts` (and
        logged, without contents), in a second statement that runs only when rows were
        skipped. With `fences` (sorted, services/storage/event_fences.py), the lease fences
        are raised in the insert's statement, and a stale one raises FailedPrecondition with
        nothing written."""
        return await self._insert(batch, partition, (INSERT_BATCH, INSERT_BATCH_JOINED), fences)

    async def insert_partitions(
        self, batch: BatchColumns, *, partitions: list[int], fences: Sequence[Fence] = ()
    ) -> int:
        """As insert_batch, with the partition of each row (`partitions`, one per event): the
        entries of several partitions in one statement, so one round trip and one commit."""
        if len(partitions) != len(batch):
            raise ValueError("one partition per row")
        return await self._insert(
            batch, partitions, (INSERT_PARTITIONS, INSERT_PARTITIONS_JOINED), fences
        )

    async def _insert(
        self,
        batch: BatchColumns,
        partition: int | list[int],
        statements: tuple[str, str],
        fences: Sequence[Fence],
    ) -> int:
        """Run the array statement or, when the texts can be joined, its joined twin."""
        if not batch:
            return 0
        texts: list[Any] = [
            batch.ids,
            batch.keys,
            batch.types,
            batch.content_types,
            batch.attributes,
            batch.producers,
            batch.tenants,
        ]
        statement, joined_statement = statements
        conflicts = RECORD_CONFLICTS
        joined = [TEXT_SEPARATOR.join(values) for values in texts]
        joinable = texts_joinable(joined, len(batch))
        if joinable:
            statement, conflicts, texts = joined_statement, RECORD_CONFLICTS_JOINED, joined
        fenced: tuple[Any, ...] = ()
        if fences:
            statement = FENCED_INSERTS[(joinable, isinstance(partition, list))]
            fenced = fence_arguments(fences)
        ids, keys, types, content_types, attributes, producers, tenants = texts
        columns = (
            ids,
            keys,
            types,
            batch.event_times,
            batch.event_time_nanos,
            batch.payloads,
            content_types,
            attributes,
            batch.ingest_times,
            producers,
        )
        async with (
            outage_is_unavailable("insert"),
            self._pool.acquire(timeout=self._acquire_timeout) as conn,
        ):
            status = await _insert_once_stored(
                conn, statement, *columns, partition, tenants, *fenced
            )
            inserted = int(status.rsplit(" ", 1)[1])  # "INSERT 0 <rows>"
            if inserted < len(batch):
                # Some rows were skipped (their id is stored): the rare path checks them.
                status = await conn.execute(conflicts, *columns, tenants)
                _log_conflicts(batch, int(status.rsplit(" ", 1)[1]))
        if inserted and self._committed is not None:
            self._committed(batch.tenants)
        return inserted
